"""Hostile numbers: NaN/Inf in weights, requests that overflow, VAEs that overflow or do not fit. Each must
end in a clear error within seconds (or, for an fp16 VAE overflow, in the right image), never in a black
PNG or a traceback. Training that diverges and damaged resume states: test_fuzz_train.py.

Where request validation (written elsewhere) might refuse a value first, ``no_validation`` bypasses it so
that the check under test is the one that fires.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import load_file, save_file

import latentforge
from latentforge.cli import main
from latentforge.io.components import LoadError
from latentforge.pipelines import GenerationRequest, NonFiniteError, RequestError, numerics
from latentforge.pipelines.numerics import decode_checked
from tiny import build_reference, perturb, save_folder

UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
VAE_KEY = "first_stage_model.decoder.up.1.block.0.conv1.weight"
TEXT_KEY = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
SMALL = dict(steps=3, width=64, height=64, seed=1)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    folder = save_folder(build_reference("sd1", seed=11), tmp_path_factory.mktemp("fz") / "m")
    return latentforge.load(folder).save(tmp_path_factory.mktemp("fz") / "sd1.safetensors")


@pytest.fixture(scope="module")
def pipe(sd1_file):
    return latentforge.load(sd1_file, dtype="fp32")


@pytest.fixture
def no_validation(monkeypatch):
    """Let values through that request validation may refuse, to reach the numeric checks behind it."""
    monkeypatch.setattr(GenerationRequest, "validate", lambda self, **kw: None)


@pytest.fixture(params=[0, 1], ids=["read-at-once", "read-a-step-later"])
def check_lag(request, monkeypatch):
    """Both ways of reading the per-step checks: at once (the CPU default) and one step late (the CUDA
    default, which keeps the GPU fed): the error must name the same step either way."""
    init = numerics.FiniteWatch.__init__
    monkeypatch.setattr(
        numerics.FiniteWatch, "__init__", lambda self, p, dtype=None, lag=None: init(self, p, dtype, request.param)
    )
    return request.param


def _with_value(src, dst, key: str, value: float, where=(0,)):
    state = load_file(src)
    t = state[key]
    t.view(-1)[list(where)] = value
    save_file(state, dst, metadata={"format": "pt"})
    return dst


# --- weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        (UNET_KEY, math.nan, "UNet"),
        (VAE_KEY, math.inf, "VAE"),
        (TEXT_KEY, -math.inf, "text encoder"),
        ("model.diffusion_model.out.2.bias", math.nan, "UNet"),
    ],
)
def test_non_finite_weights_are_refused_with_file_and_tensor(sd1_file, tmp_path, key, value, what):
    bad = _with_value(sd1_file, tmp_path / "bad.safetensors", key, value, where=(0, 3))
    with pytest.raises(LoadError) as e:
        latentforge.load(bad, dtype="fp32")
    message = str(e.value)
    assert key in message and "bad.safetensors" in message and what in message
    assert f"holds 2 {'NaN' if math.isnan(value) else 'Inf'}" in message


def test_non_finite_weights_in_a_pickle_and_a_diffusers_folder(sd1_file, tmp_path):
    state = load_file(sd1_file)
    state[UNET_KEY][1, 1] = math.nan
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(LoadError, match=r"bad\.ckpt.*holds 1 NaN"):
        latentforge.load(tmp_path / "bad.ckpt", dtype="fp32")
    folder = save_folder(build_reference("sd1", seed=12), tmp_path / "folder")
    weights = folder / "text_encoder" / "model.safetensors"
    _with_value(weights, weights, "encoder.layers.0.self_attn.q_proj.weight", math.inf)
    with pytest.raises(LoadError, match=r"text encoder.*q_proj.*holds 1 Inf"):
        latentforge.load(folder)


def test_weights_that_overflow_the_requested_dtype_are_refused_with_the_dtype(sd1_file, tmp_path):
    bad = _with_value(sd1_file, tmp_path / "big.safetensors", UNET_KEY, 1e6)  # finite in fp32, > 65504
    with pytest.raises(LoadError, match=r"largest magnitude 1e\+06.*does not fit in float16.*--dtype fp32"):
        latentforge.load(bad, dtype="fp16")
    assert latentforge.load(bad, dtype="fp32").unet is not None  # the same file is fine in fp32


def test_non_finite_weights_given_after_loading_stop_generation(sd1_file, check_lag):
    p = latentforge.load(sd1_file, dtype="fp32")
    with torch.no_grad():
        p.unet.out[2].bias[0] = math.nan
    with pytest.raises(NonFiniteError, match=r"pass 'txt2img', step 1 of 3 .*NaN/Inf in the weights"):
        p.txt2img("a cat", **SMALL)
    p = latentforge.load(sd1_file, dtype="fp32")
    with torch.no_grad():
        p.text_encoders[0].final_layer_norm.weight[5] = math.inf  # the context: every token's channel 5
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 .*prompt's conditioning"):
        p.txt2img("a cat", **SMALL)


# --- requests that overflow -----------------------------------------------------------------------------


def test_huge_cfg_scale_stops_at_the_first_step(pipe, no_validation, tmp_path, check_lag):
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 \(sigma 14\.6.*cfg_scale 1e\+308 is too large"):
        pipe.txt2img("a cat", cfg_scale=1e308, **SMALL)
    # 1e30 stays finite in the first step and overflows in the next one: the huge latents are named
    with pytest.raises(NonFiniteError, match=r"step 2 of 3 .*far too large.*cfg_scale 1e\+30"):
        pipe.txt2img("a cat", cfg_scale=1e30, **SMALL)
    # ... also when that step is the last one, whose check a lagging watch reads at the end of the pass
    with pytest.raises(NonFiniteError, match=r"step 2 of 2 .*far too large.*cfg_scale 1e\+30"):
        pipe.txt2img("a cat", cfg_scale=1e30, **{**SMALL, "steps": 2})


def test_an_interruption_does_not_hide_a_nan(pipe, no_validation, check_lag):
    """A progress callback that stops the run in the step whose check is still pending (one step late on a
    GPU): the NaN is reported, not handed on as the interrupted run's result."""
    from latentforge.pipelines.generate import Interrupted

    def stop(progress):
        raise Interrupted()

    with pytest.raises(NonFiniteError, match=r"step 1 of 3 .*cfg_scale 1e\+308"):
        pipe.txt2img("a cat", cfg_scale=1e308, progress=stop, **SMALL)


def test_infinite_or_huge_s_noise_names_the_noise(pipe, no_validation, check_lag):
    with pytest.raises(NonFiniteError, match=r"step 2 of 3 .*s_noise inf\).*already NaN/Inf.*s_noise, eta"):
        pipe.txt2img("a cat", sampler="Euler a", s_noise=math.inf, **SMALL)
    with pytest.raises(NonFiniteError, match=r"step 2 of 3 .*far too large.*s_noise, eta"):
        pipe.txt2img("a cat", sampler="Euler a", s_noise=1e30, **SMALL)
    # the last step of Euler a adds no noise: s_noise = inf on a one-step run leaves the result finite
    one_step = pipe.txt2img("a cat", sampler="Euler a", s_noise=math.inf, **{**SMALL, "steps": 1})
    assert np.asarray(one_step.images[0]).std() > 0


def test_overflowing_prompt_weight_is_named(pipe):
    # a weight of 1e40 is inf in float32; prompt parsing may come to refuse it first (a RequestError)
    with pytest.raises((NonFiniteError, RequestError), match="weight"):
        pipe.txt2img("(a cat:1" + "0" * 40 + ")", **SMALL)


def test_cli_prints_one_line_and_exits_2(sd1_file, tmp_path, capsys, no_validation):
    out = tmp_path / "x.png"
    args = ["txt2img", "a cat", "-m", str(sd1_file), "--cfg", "1e308", "--steps", "2", "-W", "64", "-H", "64"]
    code = main([*args, "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("latentforge: error: ") and err.count("\n") == 1 and "cfg_scale" in err


# --- VAE decode -----------------------------------------------------------------------------------------


def _overflow_in_fp16(module, args, out):
    return out * 1e5 / 1e5  # in fp16 the product passes 65504 and becomes inf; in fp32 it is harmless


def test_fp16_vae_overflow_is_decoded_again_in_fp32(sd1_file, caplog):
    p16 = latentforge.load(sd1_file, dtype="fp16")
    reference = copy.deepcopy(p16.vae).float()  # the same fp16-rounded weights, decoded in fp32, no hook
    p16.patcher.add_hook("overflow", p16.vae.decoder.mid, post=_overflow_in_fp16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.isfinite(p16.vae.decode(latents)).all()  # the patch does overflow in fp16
        with caplog.at_level(logging.WARNING, logger="latentforge"):
            images = decode_checked(p16.vae.decode, latents)
        expected = reference.decode(latents)
    assert "overflowed in fp16" in caplog.text
    assert images.dtype == torch.float32 and p16.vae.dtype == torch.float16  # the VAE itself is unchanged
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # through generation: the same pixels as an fp32 VAE under the same fp16 UNet
    got = np.asarray(p16.txt2img("a cat", **SMALL).images[0]).astype(int)
    p32 = latentforge.load(sd1_file, dtype="fp16")
    p32.vae = p32.vae.float()
    want = np.asarray(p32.txt2img("a cat", **SMALL).images[0]).astype(int)
    assert np.abs(got - want).max() <= 1 and want.std() > 0


def test_vae_that_is_nan_in_every_dtype_is_an_error(sd1_file, pipe):
    p16 = latentforge.load(sd1_file, dtype="fp16")
    p16.patcher.add_hook("nan", p16.vae.decoder.mid, post=lambda m, a, out: out * math.nan)
    with pytest.raises(NonFiniteError, match="VAE decode gave NaN/Inf pixels in fp16 and again in fp32"):
        p16.txt2img("a cat", **SMALL)
    p32 = latentforge.load(sd1_file, dtype="fp32")
    p32.patcher.add_hook("nan", p32.vae.decoder.conv_out, post=lambda m, a, out: out * math.nan)
    with pytest.raises(NonFiniteError, match=r"VAE decode \(float32\) gave NaN/Inf"):
        p32.txt2img("a cat", **SMALL)


# --- VAEs that do not fit -------------------------------------------------------------------------------


def _diffusers_vae(path, blocks=(32, 64, 64, 64), latent=4, scale=0.18215):
    vae = DiffusersVAE(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=2,
        latent_channels=latent,
        norm_num_groups=32,
        scaling_factor=scale,
    )
    perturb(vae, 5).save_pretrained(path)
    return path


def test_vae_of_another_downscale_or_latent_channels_is_refused(sd1_file, tmp_path):
    f4 = _diffusers_vae(tmp_path / "f4", blocks=(32, 64, 64))  # 3 levels: f = 2^2 = 4 (the x4 upscaler's)
    with pytest.raises(LoadError, match=r"does not fit a sd1 model.*downscale factor f=4, the model's VAE has f=8"):
        latentforge.load(sd1_file, vae=f4)
    c8 = _diffusers_vae(tmp_path / "c8", latent=8)
    with pytest.raises(LoadError, match=r"8 latent channels, the model's latents have 4"):
        latentforge.load(sd1_file, vae=c8)


def test_vae_declaring_another_latent_scale_is_refused(sd1_file, tmp_path):
    xl = _diffusers_vae(tmp_path / "xl", scale=0.13025)  # SDXL's scaling_factor in its config.json
    with pytest.raises(LoadError, match=r"latent scale 0\.13025 \(scaling_factor in .*config\.json\).* is 0\.18215"):
        latentforge.load(sd1_file, vae=xl)
    ok = _diffusers_vae(tmp_path / "ok", scale=0.18215)
    assert latentforge.load(sd1_file, vae=ok).info.vae_source == str(ok)
    vae_only = {k: v for k, v in load_file(sd1_file).items() if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "xl.safetensors", metadata={"latentforge.family": "sdxl-base"})
    with pytest.raises(LoadError, match=r"latent scale 0\.13025 \(its metadata \(latentforge\.family = sdxl-base\)"):
        latentforge.load(sd1_file, vae=tmp_path / "xl.safetensors")
    # same architecture and nothing declared: an SDXL VAE cannot be told from an SD1 one (documented)
    save_file(vae_only, tmp_path / "plain.safetensors")
    assert latentforge.load(sd1_file, vae=tmp_path / "plain.safetensors").vae.config.downscale == 8
