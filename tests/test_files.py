"""Loading the files users bring: strictness, damaged files, pickles, round trips, VAE files, eps/v."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentforge
from latentforge.families.detect import probe_prediction
from latentforge.io.components import LoadError
from latentforge.io.tensorfile import CheckpointError
from tiny import build_reference, close, save_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny single-file checkpoints (sd1, sd2, sdxl-base) written by latentforge from reference folders."""
    tmp = tmp_path_factory.mktemp("files")
    out = {}
    for name in ("sd1", "sd2", "sdxl-base"):
        folder = save_folder(build_reference(name, seed=7), tmp / f"{name}_folder")
        out[name] = latentforge.load(folder).save(tmp / f"{name}.safetensors")
        out[name + "_folder"] = folder
    return out


def _resave(src, dst, change=None, metadata=None):
    sd = load_file(src)
    if change:
        change(sd)
    save_file(sd, dst, metadata=metadata)
    return dst


# --- strictness and damaged files --------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_all_named(files, tmp_path):
    def damage(sd):
        del sd["model.diffusion_model.out.2.bias"]
        sd["model.diffusion_model.input_blocks.1.0.bogus.weight"] = torch.zeros(3)
        w = sd["first_stage_model.decoder.conv_out.weight"]
        sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1, 3, 3)

    bad = _resave(files["sd1"], tmp_path / "bad.safetensors", damage)
    with pytest.raises(LoadError) as err:
        latentforge.load(bad)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "out.2.bias" in msg
    assert "unexpected keys (1)" in msg and "input_blocks.1.0.bogus.weight" in msg
    assert "VAE weights" in msg and "decoder.conv_out.weight: file [3, 33, 3, 3], model [3, 32, 3, 3]" in msg


def test_truncated_and_corrupt_safetensors(files, tmp_path):
    data = files["sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        latentforge.load(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        latentforge.load(tmp_path / "tiny.safetensors")
    n = int.from_bytes(data[:8], "little")
    (tmp_path / "header.safetensors").write_bytes(data[:8] + b"\xff}}" + data[11 : 8 + n] + data[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        latentforge.load(tmp_path / "header.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        latentforge.load(tmp_path / "nope.safetensors")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown weights file type"):
        latentforge.load(tmp_path / "model.txt")


def test_ckpt_nested_state_dict_loads_like_safetensors(files, tmp_path):
    sd = load_file(files["sd1"])
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 3}, tmp_path / "m.ckpt")
    a, b = latentforge.load(files["sd1"]), latentforge.load(tmp_path / "m.ckpt")
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def _fake_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[name] = mod
    return mod


def test_old_sd1_ckpt_with_lightning_callbacks_loads(files, tmp_path):
    mod = _fake_module("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", torch.tensor(0.1)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    try:
        torch.save(
            {"state_dict": load_file(files["sd1"]), "callbacks": {ModelCheckpoint: ModelCheckpoint()}},
            tmp_path / "old.ckpt",
        )
    finally:
        for name in [n for n in sys.modules if n.startswith("pytorch_lightning")]:
            del sys.modules[name]
    pipe = latentforge.load(tmp_path / "old.ckpt")
    assert pipe.family.name == "sd1"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('LF_SENTINEL', '/tmp/latentforge-pwned')}",))


def test_pickle_that_needs_unsafe_unpickling_is_refused_and_runs_nothing(files, tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("LF_SENTINEL", str(sentinel))
    torch.save({"state_dict": load_file(files["sd1"]), "payload": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as err:
        latentforge.load(tmp_path / "evil.ckpt")
    assert not sentinel.exists()
    msg = str(err.value)
    assert "unsafe unpickling" in msg and "system" in msg and "safetensors" in msg


def test_truncated_ckpt(files, tmp_path):
    torch.save(load_file(files["sd1"]), tmp_path / "m.ckpt")
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a readable"):
        latentforge.load(tmp_path / "cut.ckpt")


# --- round trips -----------------------------------------------------------------------------------


def test_single_file_round_trip_is_exact_and_keeps_extras(files, tmp_path):
    def add_extras(sd):
        sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
        sd["cond_stage_model.model.text_projection"] = torch.randn(128, 128)
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.diffusion_modelout2bias"] = torch.zeros(4)

    src = _resave(files["sd2"], tmp_path / "src.safetensors", add_extras, metadata={"format": "pt"})
    pipe = latentforge.load(src, prediction="eps")
    assert "alphas_cumprod" in pipe.info.extras and len(pipe.info.dropped) == 2
    out = pipe.save(tmp_path / "out.safetensors")
    a, b = load_file(src), load_file(out)
    assert set(b) == {k for k in a if not k.startswith("model_ema.")}
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["sd1", "sdxl-base"])
def test_single_file_to_diffusers_and_back(files, tmp_path, name):
    first = latentforge.load(files[name])
    folder = first.save(tmp_path / "folder", layout="diffusers")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    back = latentforge.load(folder).save(tmp_path / "back.safetensors")
    a, b = load_file(files[name]), load_file(back)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sd2_diffusers_folder_stores_23_of_24_layers_and_pads_back(files, tmp_path):
    pipe = latentforge.load(files["sd2"], prediction="eps")
    layers = pipe.text_encoders[0].config.layers
    folder = pipe.save(tmp_path / "folder", layout="diffusers")
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == layers - 1
    again = latentforge.load(folder)
    ids = pipe.tokenizers[0](["a red cube"])
    torch.testing.assert_close(again.encode_prompt("a red cube").context, pipe.encode_prompt("a red cube").context)
    assert again.text_encoders[0](ids, layer=-2).hidden.shape == (1, 77, cfg["hidden_size"])


def test_diffusers_pipeline_reads_our_folder(files, tmp_path):
    """diffusers' own from_pretrained loads the folder latentforge writes, with identical weights."""
    from diffusers import StableDiffusionPipeline

    pipe = latentforge.load(files["sd1"])
    folder = pipe.save(tmp_path / "folder", layout="diffusers")
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    ctx = torch.randn(1, 77, 128)
    assert close(pipe.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample)[0]
    ids = ref.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert close(pipe.encode_prompt("a cat").context, ref.text_encoder(ids)[0])[0]


# --- dtype, VAE files ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_is_applied_while_loading(files, dtype, torch_dtype):
    pipe = latentforge.load(files["sd1"], dtype=dtype)
    for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
        assert {p.dtype for p in module.parameters()} == {torch_dtype}
    with pytest.raises(ValueError, match="unknown dtype"):
        latentforge.load(files["sd1"], dtype="int3")


def _vae_variants(files, tmp_path):
    sd = load_file(files["sd1"])
    vae = {k: v * 1.5 for k, v in sd.items() if k.startswith("first_stage_model.")}
    prefixed = tmp_path / "a.vae.safetensors"
    save_file(vae, prefixed)
    bare = tmp_path / "b.vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in vae.items()}, bare)
    pt = tmp_path / "c.vae.pt"
    torch.save({"state_dict": {k.removeprefix("first_stage_model."): v for k, v in vae.items()}}, pt)
    # a diffusers-named VAE: written by loading the variant into a pipeline and saving as diffusers
    pipe = latentforge.load(files["sd1"], vae=bare)
    folder = pipe.save(tmp_path / "dfolder", layout="diffusers")
    return vae, [prefixed, bare, pt, folder / "vae", folder / "vae" / "diffusion_pytorch_model.safetensors"]


def test_separate_vae_files_replace_the_checkpoint_vae(files, tmp_path):
    vae, variants = _vae_variants(files, tmp_path)
    for path in variants:
        pipe = latentforge.load(files["sd1"], vae=path)
        assert pipe.info.vae_source == str(path)
        for k, v in pipe.vae.state_dict().items():
            assert torch.equal(v, vae["first_stage_model." + k]), (path, k)


# --- eps / v ---------------------------------------------------------------------------------------


def test_prediction_order_explicit_then_sidecar_then_metadata(files, tmp_path):
    bare = _resave(files["sd2"], tmp_path / "m.safetensors")  # no metadata
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    pipe = latentforge.load(bare)
    assert (pipe.family.name, pipe.prediction) == ("sd2-v", "v")
    assert "sidecar" in pipe.info.prediction_reason and pipe.unet.config.upcast_attention
    pipe = latentforge.load(bare, prediction="eps")
    assert (pipe.family.name, pipe.prediction) == ("sd2", "eps") and "explicit" in pipe.info.prediction_reason
    (tmp_path / "m.yaml").unlink()
    tagged = _resave(files["sd2"], tmp_path / "t.safetensors", metadata={"modelspec.prediction_type": "v"})
    assert latentforge.load(tagged).prediction == "v"
    vkey = _resave(files["sdxl-base"], tmp_path / "x.safetensors", lambda sd: sd.update(v_pred=torch.tensor([])))
    pipe = latentforge.load(vkey)
    assert (pipe.family.name, pipe.prediction) == ("sdxl-base", "v") and "v_pred" in pipe.info.prediction_reason


def test_probe_decides_only_for_ambiguous_structures(files, tmp_path):
    bare = _resave(files["sd2"], tmp_path / "m.safetensors")
    pipe = latentforge.load(bare)
    assert "probe" in pipe.info.prediction_reason
    assert "probe" not in latentforge.load(_resave(files["sd1"], tmp_path / "s.safetensors")).info.prediction_reason


def test_probe_reads_the_output_mean():
    """A UNet that outputs a constant c: mean(out - x) = c - 0.5 at x = 0.5; below -1 means v."""
    from latentforge.models import UNet

    unet = UNet(
        latentforge.get_family("sd2").unet.__class__(
            model_channels=64,
            channel_mult=(1, 1),
            transformer_depth=(1, 0),
            head_channels=64,
            num_heads=None,
            context_dim=64,
            use_linear_proj=True,
        )
    ).eval()
    with torch.no_grad():
        unet.out[2].weight.zero_()
        unet.out[2].bias.fill_(-5.0)
        assert probe_prediction(unet)[0] == "v"
        unet.out[2].bias.fill_(0.2)
        assert probe_prediction(unet)[0] == "eps"


@pytest.mark.parametrize("cache", ["[1, 2]", '"text"', "{not json", '{"KEY": 5}', '{"KEY": "abc"}'])
def test_damaged_hash_cache_is_rebuilt(tmp_path, monkeypatch, cache):
    import hashlib

    from latentforge.io.hashing import sha256_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights")
    st = f.stat()
    (tmp_path / "cache" / "latentforge").mkdir(parents=True)
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    (tmp_path / "cache" / "latentforge" / "hashes.json").write_text(cache.replace("KEY", key))
    assert sha256_of(f) == hashlib.sha256(b"weights").hexdigest()
