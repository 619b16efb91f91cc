"""Choosing the VAE of a loaded model: ``Pipeline.set_vae`` (a file, a name in ``folders.vae``, or the
checkpoint's own again) and A1111's ``sd_vae`` setting on the server (``/sdapi/v1/sd-vae``, options,
override_settings, an infotext's "VAE"). Expected images come from ``latentforge.load(..., vae=...)``, the
load-time route that was there before, and hashes from hashlib."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.io.components import LoadError

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")
GEN = {"seed": 5, "steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler": "Euler"}


def _write_vae(path, scale: float, metadata=None):
    """The demo model's own VAE with its weights scaled: another VAE of the same architecture."""
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    save_file({k: (v * scale).contiguous() for k, v in pipe.vae.state_dict().items()}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    (root / "VAE").mkdir()
    return {
        "soft": _write_vae(root / "VAE" / "soft.safetensors", 0.9),
        "other": _write_vae(root / "VAE" / "other.safetensors", 1.1),
        "root": root,
    }


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def _sha10(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:10]


def test_set_vae_decodes_as_loading_with_that_vae_and_back(vaes):
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    own = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    plain = pipe.txt2img("a red circle", **GEN)
    pipe.folders.vae = [vaes["root"] / "VAE"]

    pipe.set_vae("soft")  # by stem in folders.vae
    swapped = pipe.txt2img("a red circle", **GEN)
    ref = latentforge.load(bundled_model_path(), dtype="fp32", vae=vaes["soft"]).txt2img("a red circle", **GEN)
    assert np.array_equal(_pixels(swapped), _pixels(ref))
    assert not np.array_equal(_pixels(swapped), _pixels(plain))
    assert f"VAE hash: {_sha10(vaes['soft'])}, VAE: soft.safetensors" in swapped.infotexts[0]

    pipe.set_vae("other.safetensors")  # by file name
    assert "VAE: other.safetensors" in pipe.txt2img("a red circle", **GEN).infotexts[0]

    pipe.set_vae(None)  # the checkpoint's own, bit for bit
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, own[k]), k
    back = pipe.txt2img("a red circle", **GEN)
    assert np.array_equal(_pixels(back), _pixels(plain)) and "VAE" not in back.infotexts[0].split("\n")[-1]


def test_set_vae_none_reloads_the_checkpoint_vae_when_loaded_with_another(vaes):
    pipe = latentforge.load(bundled_model_path(), dtype="fp32", vae=vaes["soft"])
    pipe.set_vae(None)
    fresh = latentforge.load(bundled_model_path(), dtype="fp32")
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, fresh.vae.state_dict()[k]), k
    assert pipe.info.vae_source == "checkpoint"


def test_a_vae_that_does_not_fit_is_refused_and_the_current_one_stays(vaes, tmp_path):
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    before = pipe.vae
    wrong = _write_vae(tmp_path / "xl.safetensors", 1.0, metadata={"latentforge.family": "sdxl-base"})
    with pytest.raises(LoadError, match="latent scale"):
        pipe.set_vae(wrong)
    assert pipe.vae is before and pipe.info.vae_source == "checkpoint"
    pipe.folders.vae = [vaes["root"] / "VAE"]
    with pytest.raises(LookupError, match="VAE 'nosuch'"):
        pipe.set_vae("nosuch")


# --- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(vaes, tmp_path_factory):
    pytest.importorskip("fastapi")
    from serverproc import Server

    root = tmp_path_factory.mktemp("inst")
    models = root / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    shutil.copytree(vaes["root"] / "VAE", root / "models" / "VAE")
    shutil.copy(bundled_model_path(), models / "demo.safetensors")
    shutil.copy(bundled_model_path(), models / "twin.safetensors")
    shutil.copy(vaes["other"], models / "twin.vae.safetensors")  # A1111's VAE beside a checkpoint
    s = Server("--models-dir", str(models), "--max-models", "2", tmp=root)
    yield s
    s.close()


def _image(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


BODY = {
    "prompt": "a red circle",
    "seed": 5,
    "steps": 3,
    "width": 64,
    "height": 64,
    "cfg_scale": 5,
    "sampler_name": "Euler",
}


def _python(vae=None) -> np.ndarray:
    pipe = latentforge.load(bundled_model_path(), dtype="fp32", vae=vae)
    return _pixels(pipe.txt2img("a red circle", **GEN))


def test_server_lists_vaes_and_applies_sd_vae_as_the_python_api(server, vaes):
    listed = server.get("/sdapi/v1/sd-vae").json()
    names = {row["model_name"] for row in listed}
    assert names == {"soft.safetensors", "other.safetensors", "twin.vae.safetensors"}
    assert all("/" not in row["filename"] for row in listed)  # no server paths
    models = [row["title"] for row in server.get("/sdapi/v1/sd-models").json()]
    assert "twin.vae.safetensors" not in models  # a VAE beside a checkpoint is no checkpoint (A1111)

    over = server.post("/sdapi/v1/txt2img", {**BODY, "override_settings": {"sd_vae": "soft.safetensors"}})
    assert over.status_code == 200, over.text
    assert np.array_equal(_image(over.json()["images"][0]), _python(vaes["soft"]))
    info = json.loads(over.json()["info"])
    assert info["sd_vae_name"] == "soft.safetensors" and info["sd_vae_hash"] == _sha10(vaes["soft"])
    assert "VAE: soft.safetensors" in info["infotexts"][0]

    plain = server.post("/sdapi/v1/txt2img", BODY)  # restored afterwards: the checkpoint's own again
    assert np.array_equal(_image(plain.json()["images"][0]), _python())
    assert json.loads(plain.json()["info"])["sd_vae_name"] is None

    # the setting, by stem; then an infotext's VAE fills the override
    assert server.post("/sdapi/v1/options", {"sd_vae": "soft"}).status_code == 200
    assert server.get("/sdapi/v1/options").json()["sd_vae"] == "soft.safetensors"
    by_option = server.post("/sdapi/v1/txt2img", BODY)
    assert np.array_equal(_image(by_option.json()["images"][0]), _python(vaes["soft"]))
    assert server.post("/sdapi/v1/options", {"sd_vae": "None"}).status_code == 200
    pasted = server.post("/sdapi/v1/txt2img", {"infotext": info["infotexts"][0]})
    assert pasted.status_code == 200, pasted.text
    assert "VAE: soft.safetensors" in json.loads(pasted.json()["info"])["infotexts"][0]


def test_server_automatic_vae_is_the_one_beside_the_checkpoint(server, vaes):
    body = {**BODY, "override_settings": {"sd_model_checkpoint": "twin", "sd_vae": "Automatic"}}
    auto = server.post("/sdapi/v1/txt2img", body)
    assert auto.status_code == 200, auto.text
    assert np.array_equal(_image(auto.json()["images"][0]), _python(vaes["other"]))
    none = server.post(
        "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "twin", "sd_vae": "None"}}
    )
    assert np.array_equal(_image(none.json()["images"][0]), _python())


@pytest.mark.parametrize(
    "value, words",
    [("nosuch.safetensors", "unknown VAE"), ("../VAE/soft.safetensors", "is a path"), (5, "VAE name")],
)
def test_server_refuses_unknown_vaes_and_paths(server, value, words):
    for r in (
        server.post("/sdapi/v1/txt2img", {**BODY, "override_settings": {"sd_vae": value}}),
        server.post("/sdapi/v1/options", {"sd_vae": value}),
    ):
        assert r.status_code == 400 and words in r.text, r.text
        assert "sd_vae" in r.text
    assert server.get("/sdapi/v1/options").status_code == 200


def test_server_hires_checkpoint_runs_the_other_model_with_its_vae(server, vaes):
    """hr_checkpoint_name names a listed model; the hires pass runs it with the VAE sd_vae gives it
    (Automatic: twin's own twin.vae.safetensors), as the Python API given that model loaded with that VAE."""
    body = {**BODY, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}
    auto = {"override_settings": {"sd_vae": "Automatic"}}
    r = server.post("/sdapi/v1/txt2img", {**body, **auto, "hr_checkpoint_name": "twin.safetensors"})
    assert r.status_code == 200, r.text
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    twin = latentforge.load(bundled_model_path(), dtype="fp32", vae=vaes["other"])
    want = pipe.txt2img("a red circle", enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_checkpoint_name=twin,
                        **{**GEN, "denoising_strength": 0.5})  # fmt: skip
    assert np.array_equal(_image(r.json()["images"][0]), _pixels(want))
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Hires checkpoint: twin [" in text
    again = server.post("/sdapi/v1/txt2img", {"infotext": text, **auto})  # the name from the infotext
    assert again.status_code == 200 and np.array_equal(_image(again.json()["images"][0]), _pixels(want))
    bad = server.post("/sdapi/v1/txt2img", {**body, "hr_checkpoint_name": "../elsewhere.safetensors"})
    assert bad.status_code == 400 and "hr_checkpoint_name" in bad.text


def test_an_infotexts_vae_the_server_lacks_falls_back_to_the_checkpoints_own(server):
    """A1111 ("Couldn't find VAE named ...; using None instead"): an infotext's VAE that is not here is not
    a reason to refuse the request, unlike an override_settings.sd_vae the client sends."""
    text = "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 5, Size: 64x64, VAE: vae-ft-mse.safetensors"
    r = server.post("/sdapi/v1/txt2img", {"infotext": text, "override_settings": {"sd_model_checkpoint": "demo"}})
    assert r.status_code == 200, r.text
    assert np.array_equal(_image(r.json()["images"][0]), _python())
    assert json.loads(r.json()["info"])["sd_vae_name"] is None


def test_automatic_is_a1111s_prefix_rule_and_vaes_are_named_by_file(tmp_path):
    """A1111's find_vae_near_checkpoint: the first listed VAE whose file name starts with the checkpoint's
    stem, listed as refresh_vae_list does (*.vae.* beside the checkpoints, then the VAE folders, each by
    extension: ckpt, pt, safetensors); x.pt and x.safetensors are two VAEs."""
    from latentforge.server.config import ServerConfig
    from latentforge.server.models import ModelCache, ModelCatalog

    models = tmp_path / "models" / "Stable-diffusion"
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    models.mkdir()
    for name in ("alpha.safetensors", "beta.safetensors"):
        (models / name).write_bytes(b"x")
    for name in ("alpha-vae.pt", "alpha-vae.safetensors", "zeta.safetensors"):
        (tmp_path / "models" / "VAE" / name).write_bytes(b"x")
    (models / "beta.vae.ckpt").write_bytes(b"x")
    (tmp_path / "models" / "VAE" / "beta-anime.pt").write_bytes(b"x")  # after the one beside beta
    config = ServerConfig(models_dir=models)
    listed = ["beta.vae.ckpt", "alpha-vae.pt", "beta-anime.pt", "alpha-vae.safetensors", "zeta.safetensors"]
    assert list(config.vaes()) == listed
    cache = ModelCache(ModelCatalog(None, models), config)
    assert cache.vae_path("alpha.safetensors", "Automatic").name == "alpha-vae.pt"
    assert cache.vae_path("beta.safetensors", "Automatic").name == "beta.vae.ckpt"
    assert cache.vae_path("beta.safetensors", "None") is None
    assert cache.vae_path("alpha.safetensors", "zeta.safetensors").name == "zeta.safetensors"
    assert "beta.vae.ckpt" not in ModelCatalog(None, models).names()
