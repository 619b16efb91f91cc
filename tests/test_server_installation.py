"""A server started on an A1111 installation (--models-dir models/Stable-diffusion): its LoRAs and
embeddings are found and listed, and A1111's Extras routes upscale with its models/ESRGAN.

/sdapi/v1/extra-single-image and extra-batch-images work as A1111's Upscaler.upscale
does them (modules/upscaler.py): the target is the scaled size rounded down to a multiple of 8; a
network runs until the image is at least that large, then Lanczos gives the exact size. Expected
images are made here with PIL and the network's own forward, step by step as A1111 describes."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("fastapi")

from latentforge import upscalers
from latentforge.demo import bundled_model_path
from latentforge.models.esrgan import SRVGGNetCompact
from serverproc import Server
from serverproc import b64_png as _b64

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")
LANCZOS = Image.Resampling.LANCZOS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inst")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "ESRGAN").mkdir()
    shutil.copy(bundled_model_path(), root / "models" / "Stable-diffusion" / "demo.safetensors")
    net = SRVGGNetCompact(features=8, convs=2, scale=2)
    g = torch.Generator().manual_seed(3)
    save_file({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in net.state_dict().items()},
              root / "models" / "ESRGAN" / "tiny-x2.safetensors")  # fmt: skip
    demo = Path(bundled_model_path()).parent
    (root / "models" / "Lora").mkdir()
    (root / "embeddings").mkdir()
    shutil.copy(demo / "demo" / "lora" / "demo_star.safetensors", root / "models" / "Lora" / "mystar.safetensors")
    shutil.copy(demo / "demo" / "embeddings" / "scarlet.safetensors", root / "embeddings" / "myred.safetensors")
    s = Server("--models-dir", str(root / "models" / "Stable-diffusion"), tmp=root)
    yield s, root
    s.close()


def _image(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))


def test_lanczos_by_a_factor_aims_at_a_multiple_of_8(env):
    s, _ = env
    image = _photo()
    r = s.post("/sdapi/v1/extra-single-image", {"image": _b64(image), "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    # 50x30 by 2: 100x60 by the upscaler's own step, then Lanczos to 96x56 (multiples of 8 below)
    expected = image.resize((100, 60), LANCZOS).resize((96, 56), LANCZOS)
    assert np.array_equal(_image(r.json()["image"]), np.asarray(expected))
    assert "Postprocess upscaler: Lanczos" in r.json()["html_info"]
    same = s.post("/sdapi/v1/extra-single-image", {"image": _b64(image)})  # upscaler_1 "None": unchanged
    assert np.array_equal(_image(same.json()["image"]), np.asarray(image))


def test_a_network_runs_until_large_enough_then_lanczos_and_to_a_size_with_crop(env):
    s, root = env
    image = _photo()
    net = upscalers.load(root / "models" / "ESRGAN" / "tiny-x2.safetensors")
    body = {"image": _b64(image), "upscaler_1": "tiny-x2", "upscaling_resize": 3}
    r = s.post("/sdapi/v1/extra-single-image", body)
    assert r.status_code == 200, r.text
    twice = upscalers.run(upscalers.run(image, net), net)  # 2x is short of 150x90: a second pass, 200x120
    assert np.array_equal(_image(r.json()["image"]), np.asarray(twice.resize((144, 88), LANCZOS)))
    # resize_mode 1: by the larger ratio to 80x80 (80/30), then centred on an 80x80 canvas
    body = {"image": _b64(image), "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 80,
            "upscaling_resize_h": 80}  # fmt: skip
    r = s.post("/sdapi/v1/extra-single-image", body)
    scale = 80 / 30
    big = image.resize((int(50 * scale), int(30 * scale)), LANCZOS).resize((128, 80), LANCZOS)
    canvas = Image.new("RGB", (80, 80))
    canvas.paste(big, box=(40 - 64, 40 - 40))
    assert np.array_equal(_image(r.json()["image"]), np.asarray(canvas))


def test_batch_and_refusals(env):
    s, _ = env
    image = _photo()
    body = {"imageList": [{"data": _b64(image), "name": "a"}] * 2, "upscaler_1": "Nearest", "upscaling_resize": 2}
    r = s.post("/sdapi/v1/extra-batch-images", body)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    expected = image.resize((100, 60), Image.Resampling.NEAREST).resize((96, 56), LANCZOS)
    assert np.array_equal(_image(r.json()["images"][1]), np.asarray(expected))
    for change, words in (
        ({"upscaler_1": "../../etc/passwd"}, "unknown upscaler"),
        ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "face restoration"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 400}, "upscaling_resize"),
        ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 10**6}, "upscaling_resize_w"),
    ):
        r = s.post("/sdapi/v1/extra-single-image", {"image": _b64(image), **change})
        assert r.status_code == 400 and words in r.json()["detail"], (change, r.text)


def test_webuiapi_extra_single_image(env):
    webuiapi = pytest.importorskip("webuiapi")
    s, _ = env
    api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
    result = api.extra_single_image(image=_photo(), upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (96, 56)


def test_loras_and_embeddings_of_the_installation_are_found_and_listed(env):
    """serve had no LoRA folders: with --models-dir in an A1111 installation, <lora:mystar:1> from its
    models/Lora was refused ("use --lora-dir or --models-dir", neither of which did it), and /loras and
    /embeddings listed nothing, not even the bundled ones that worked."""
    s, _ = env
    loras = [x["name"] for x in s.get("/sdapi/v1/loras").json()]
    assert {"mystar", "demo_star"} <= set(loras), loras
    assert all(x["path"] is None for x in s.get("/sdapi/v1/loras").json())  # no server paths
    # A1111's alias: the file's ss_output_name (mystar is a copy of the bundled demo_star)
    assert {x["name"]: x["alias"] for x in s.get("/sdapi/v1/loras").json()}["mystar"] == "demo_star"
    assert {"myred", "scarlet"} <= set(s.get("/sdapi/v1/embeddings").json()["loaded"])
    body = {"steps": 3, "width": 64, "height": 64, "seed": 3, "cfg_scale": 7}
    mine = s.post("/sdapi/v1/txt2img", {**body, "prompt": "a large red star <lora:mystar:1>"})
    bundled = s.post("/sdapi/v1/txt2img", {**body, "prompt": "a large red star <lora:demo_star:1>"})
    plain = s.post("/sdapi/v1/txt2img", {**body, "prompt": "a large red star"})
    assert mine.status_code == 200, mine.text
    assert np.array_equal(_image(mine.json()["images"][0]), _image(bundled.json()["images"][0]))  # same file
    assert not np.array_equal(_image(mine.json()["images"][0]), _image(plain.json()["images"][0]))
    assert 'Lora hashes: "mystar: ' in json.loads(mine.json()["info"])["infotexts"][0]
    word = s.post("/sdapi/v1/txt2img", {**body, "prompt": "a myred triangle"})
    assert 'TI hashes: "myred: ' in json.loads(word.json()["info"])["infotexts"][0]


def test_serve_network_folder_flags(monkeypatch, capsys, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    from latentforge.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", "--lora-dir", str(tmp_path / "nowhere")]) == 2
    assert "--lora-dir" in capsys.readouterr().err and not apps
    (tmp_path / "loras").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "loras" / "ink.safetensors")
    assert main(["serve", "--lora-dir", str(tmp_path / "loras"), "--embeddings-dir", str(tmp_path)]) == 0
    from fastapi.testclient import TestClient

    names = [x["name"] for x in TestClient(apps[0]).get("/sdapi/v1/loras").json()]
    assert "ink" in names


def test_sd_backend_client_upscale(env):
    sbc = pytest.importorskip("sd_backend_client")
    s, _ = env
    result = sbc.A1111Webservice(s.url).upscale(_photo(), 128, 128)  # resize_mode 1 with its first upscaler
    assert [im.size for im in result["images"]] == [(128, 128)]


def test_a1111_model_routes_unload_reload_and_lists(env):
    """/unload-checkpoint frees the loaded model (sd-models gives a hash only for loaded ones) and the next
    request loads it again with the same pixels; the lists clients read on connect answer in A1111's shape."""
    s, _ = env
    body = {"prompt": "a blue square", "steps": 3, "width": 64, "height": 64, "seed": 11}
    before = s.post("/sdapi/v1/txt2img", body).json()["images"][0]
    hashes = lambda: {m["title"]: m["hash"] for m in s.get("/sdapi/v1/sd-models").json()}  # noqa: E731
    assert hashes()["demo.safetensors"]  # listed with a hash while loaded
    assert s.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert hashes()["demo.safetensors"] is None  # no longer loaded
    after = s.post("/sdapi/v1/txt2img", body)
    assert after.status_code == 200 and np.array_equal(_image(after.json()["images"][0]), _image(before))
    assert s.post("/sdapi/v1/reload-checkpoint").json() == {}
    assert s.get("/sdapi/v1/realesrgan-models").json() == [{"name": "tiny-x2", "path": None, "scale": None}]
    assert s.get("/sdapi/v1/face-restorers").json() == [] and s.get("/sdapi/v1/sd-modules").json() == []
