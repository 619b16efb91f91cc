"""Hostile numbers: NaN/Inf in weights, requests that overflow, VAEs that overflow or do not fit, training
that diverges, resume states that are damaged or foreign. Each must end in a clear error within seconds
(or, for an fp16 VAE overflow, in the right image), never in a black PNG, a NaN checkpoint or a traceback.

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
from latentforge.pipelines import GenerationRequest, NonFiniteError, RequestError
from latentforge.pipelines.numerics import decode_checked
from latentforge.train import ConfigError, TrainingDiverged, load_config, train
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


def test_non_finite_weights_given_after_loading_stop_generation(sd1_file):
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


def test_huge_cfg_scale_stops_at_the_first_step(pipe, no_validation, tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 \(sigma 14\.6.*cfg_scale 1e\+308 is too large"):
        pipe.txt2img("a cat", cfg_scale=1e308, **SMALL)
    # 1e30 stays finite in the first step and overflows in the next one: the huge latents are named
    with pytest.raises(NonFiniteError, match=r"step 2 of 3 .*far too large.*cfg_scale 1e\+30"):
        pipe.txt2img("a cat", cfg_scale=1e30, **SMALL)


def test_infinite_or_huge_s_noise_names_the_noise(pipe, no_validation):
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
            images = decode_checked(p16.vae, latents)
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


# --- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD1 model to fine-tune, as in test_train.py."""
    folder = save_folder(build_reference("sd1", seed=50), tmp_path_factory.mktemp("tb") / "m")
    return latentforge.load(folder).save(tmp_path_factory.mktemp("tb2") / "base.safetensors")


def _cfg(out, base, *extra):
    return load_config(
        None,
        [
            f'output="{out}"',
            f'model.base="{base}"',
            'data.kind="synthetic"',
            "data.size=16",
            "batch_size=4",
            "lr=2e-3",
            "lr_warmup=0",
            "ema_decay=0.9",
            "save_every=0",
            "sample_every=0",
            'mixed_precision="no"',
            "log_every=1000",
            *extra,
        ],
    )


@pytest.mark.parametrize("value", ["Infinity", "NaN", "0", "-1e-4", '"fast"'])
def test_learning_rate_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match=r"'lr'"):
        load_config(None, ['data.kind="synthetic"', f"lr={value}"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grad_clip=-1", "grad_clip"),
        ("weight_decay=Infinity", "weight_decay"),
        ("adam_betas=[0.9, 1.5]", "adam_betas"),
        ("adam_betas=[0.9]", "adam_betas"),
        ("model.min_snr_gamma=NaN", "model.min_snr_gamma"),
        ("vae.kl_weight=-Infinity", "vae.kl_weight"),
        ("ema_decay=1", "ema_decay"),
        ("steps=0", "steps"),
        ("lr_warmup=-5", "lr_warmup"),
    ],
)
def test_numeric_config_values_are_checked(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ['data.kind="synthetic"', override])


def test_diverging_training_stops_before_writing_and_names_the_step(tmp_path, base):
    out = tmp_path / "run"
    # Adam's first step moves every weight by about lr: 1e30 makes the second step's loss NaN
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2 of 3: the loss is nan.*Lower the learning rate"):
        train(_cfg(out, base, "steps=3", "lr=1e30"))
    assert not list(out.glob("**/*.safetensors")) and not (out / "state").exists()


def test_diverging_training_keeps_the_last_good_state(tmp_path, base):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 2 of 4.*last good state in .*state is kept"):
        train(_cfg(out, base, "steps=4", "lr=1e30", "save_every=1"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["checkpoint-000001.safetensors"]
    state = load_file(out / "state" / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert '"step": 1' in (out / "state" / "state.json").read_text()


def test_infinite_learning_rate_past_validation_writes_nothing(tmp_path, base, monkeypatch):
    """lr = inf is refused by the config; bypassed, the weights turn NaN in the only step and the check
    before writing stops the run."""
    cfg = _cfg(tmp_path / "run", base, "steps=1")
    cfg.lr = math.inf
    monkeypatch.setattr(type(cfg), "validate", lambda self: None)
    with pytest.raises(TrainingDiverged, match=r"step 1 of 1: after the optimizer step the weight .* NaN/Inf"):
        train(cfg)
    assert not list((tmp_path / "run").glob("**/*.safetensors"))


def test_cli_train_divergence_and_bad_lr_are_one_line_errors(tmp_path, base, capsys):
    args = ["train", "-q", f'output="{tmp_path / "run"}"', f'model.base="{base}"', 'data.kind="synthetic"']
    args += ["data.size=8", "batch_size=4", "steps=2", "save_every=0", "sample_every=0", "lr_warmup=0"]
    assert main([*args, "lr=Infinity"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config key 'lr' must be a finite number > 0.0, got inf" in err
    assert main([*args, "lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged at step 2 of 2" in err


# --- resuming from a damaged or foreign state -----------------------------------------------------------


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, base):
    """A run interrupted after 1 of 2 steps: output/state holds step 1."""
    out = tmp_path_factory.mktemp("st") / "run"
    train(_cfg(out, base, "steps=2", "model.train_text_encoder=true"), stop_after=1)
    return out


def _copy_state(saved_state, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(saved_state, out)
    return out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rename_tensor(path):
    state = load_file(path)
    key = next(k for k in state if k.startswith("model.unet."))
    state[key.replace("model.unet.", "model.unet.renamed_")] = state.pop(key)
    save_file(state, path)


def _reshape_tensor(path):
    state = load_file(path)
    key = next(k for k in state if k.startswith("model.unet.") and k.endswith(".weight"))
    state[key] = torch.zeros(3, 5)
    save_file(state, path)


def _nan_tensor(path):
    state = load_file(path)
    next(v for k, v in state.items() if k.startswith("ema.")).view(-1)[0] = math.nan
    save_file(state, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: _truncate(s / "state.safetensors"), "truncated"),
        (lambda s: (s / "state.safetensors").unlink(), "state.safetensors is missing"),
        (lambda s: (s / "state.json").unlink(), "state.json is missing"),
        (lambda s: (s / "state.json").write_text('{"step": 1, "optim'), "state.json is unreadable"),
        (lambda s: (s / "state.json").write_text("[1, 2]"), "lacks its step"),
        (lambda s: _rename_tensor(s / "state.safetensors"), r"model \(unet\) tensors do not fit.*missing.*unexpected"),
        (lambda s: _reshape_tensor(s / "state.safetensors"), r"1 of other shapes \(.*\[3, 5\] \(model \["),
        (lambda s: _nan_tensor(s / "state.safetensors"), r"NaN/Inf values \(in ema\."),
    ],
)
def test_damaged_resume_state_is_a_config_error(saved_state, tmp_path, base, damage, message):
    out = _copy_state(saved_state, tmp_path)
    damage(out / "state")
    with pytest.raises(ConfigError, match=message) as e:
        train(_cfg(out, base, "steps=2", "model.train_text_encoder=true"))
    assert "Delete that folder to start again from step 0, or set resume = false" in str(e.value)
    assert "\n" not in str(e.value)


def test_state_of_another_model_or_setup_is_refused(saved_state, tmp_path, base):
    out = _copy_state(saved_state, tmp_path)
    with pytest.raises(ConfigError, match=r"saved for another model \(model\.train_text_encoder = True in the state"):
        train(_cfg(out, base, "steps=2", "model.train_text_encoder=false"))
    other = tmp_path / "other.safetensors"
    other.write_bytes(base.read_bytes())
    moved = r"model\.base = .*base\.safetensors' in the state, .*other\.safetensors' now"
    with pytest.raises(ConfigError, match=moved):
        train(_cfg(out, other, "steps=2", "model.train_text_encoder=true"))
    # the identity check bypassed (no config given), the tensors still tell another network apart
    from latentforge.train.common import load_state

    pipe = latentforge.load(base)
    modules = {"unet": pipe.unet}
    opt = torch.optim.AdamW(pipe.unet.parameters())
    with pytest.raises(ConfigError, match=r"holds the networks \['text0', 'unet'\], the run trains \['unet'\]"):
        load_state(out, modules, {"opt": opt}, None)
    # and an intact state still resumes (the damage tests above are not the checks misfiring)
    assert train(_cfg(out, base, "steps=2", "model.train_text_encoder=true")).is_file()


def test_cli_train_with_a_damaged_state_is_a_one_line_error(saved_state, tmp_path, base, capsys):
    out = _copy_state(saved_state, tmp_path)
    _truncate(out / "state" / "state.safetensors")
    args = ["train", "-q", f'output="{out}"', f'model.base="{base}"', 'data.kind="synthetic"', "data.size=16"]
    args += ["batch_size=4", "steps=2", "save_every=0", "sample_every=0", "model.train_text_encoder=true"]
    args += ["lr=2e-3", "lr_warmup=0", "ema_decay=0.9", 'mixed_precision="no"']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume from the training state" in err and "resume = false" in err
