"""Hostile numbers in training: a learning rate that diverges, numeric config values, and resume states
that are damaged or belong to another model. Each ends in a one-line error (ConfigError or
TrainingDiverged) within seconds, and nothing is written from non-finite weights. (Generation and
loading: test_fuzz_numerics.py.)"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentforge
from latentforge.cli import main
from latentforge.train import ConfigError, TrainingDiverged, load_config, train
from tiny import quiet_train_config, tiny_sd1_file

# --- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD1 model to fine-tune, as in test_train.py."""
    return tiny_sd1_file(tmp_path_factory.mktemp("tb"), seed=50)[1]


def _cfg(out, base, *extra):
    return quiet_train_config(
        out, base, 'data.kind="synthetic"', "data.size=16", "batch_size=4", "lr=2e-3", "ema_decay=0.9", *extra
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
