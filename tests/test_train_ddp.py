"""Data-parallel training (train/distributed.py): 2 gloo processes started by torchrun equal 1 process with
the same global batch, in the modes diffusion (with the text encoder, EMA, clipping, accumulation, caption
dropout, noise offset, min-SNR), lora (with rank dropout), embedding and vae (with the discriminator); a
resumed 2-process run equals the uninterrupted one bit for bit; bad launches fail clearly.

Tolerance of the 1- vs 2-process comparison: 5e-5 absolute (+ 1e-4 relative) on every weight, EMA and
AdamW moment. The two runs do the same arithmetic except the order in which the examples' gradient
contributions are summed (inside the backward kernels over 4 examples, or 2 + 2 then across the ranks):
float32 rounding, ~1e-7 relative. AdamW normalises each update to about lr, so a weight whose true
gradient is at rounding level can still move by a fraction of lr = 1e-3 differently; measured largest
differences (loaded machine, 2 steps): diffusion 5.1e-6, lora 3.8e-6, embedding 2.3e-8, vae 2.8e-5.
An error in the data-parallel logic moves weights by ~lr: giving rank 1 the noise of rank 0's examples
fails this test (largest difference 3.5e-3; 72% of the first tensor's elements beyond tolerance).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.sampling import ModelDenoiser
from latentforge.train import ConfigError, load_config, train
from latentforge.train.common import deterministic_generator
from latentforge.train.diffusion import diffusion_loss
from latentforge.train.distributed import Distributed, launch_environment, setup
from serverproc import free_port
from tiny import QUIET_RUN

TESTS = Path(__file__).parent
SRC = Path(latentforge.__file__).parents[1]
ATOL, RTOL = 5e-5, 1e-4

COMMON = [
    'data.kind="synthetic"',
    "data.size=12",
    "data.resolution=32",
    "batch_size=4",
    "lr=1e-3",
    *QUIET_RUN,
    "log_every=1",  # after QUIET_RUN: the resumed run's printed losses are compared
    "model.caption_dropout=0.25",
    "model.noise_offset=0.05",
    "model.min_snr_gamma=5",
]
MODES = {
    "diffusion": ["steps=2", "grad_accum=2", "ema_decay=0.9", "grad_clip=0.05", "model.train_text_encoder=true"],
    "lora": ['mode="lora"', "steps=2", "ema_decay=0", "lora.text_encoder=true", "lora.dropout=0.25"],
    "embedding": ['mode="embedding"', "steps=2", "ema_decay=0", 'embedding.token="zq"', "embedding.num_vectors=2"],
    "vae": ['mode="vae"', 'model.family="demo"', "steps=2", "ema_decay=0.9", "vae.disc_weight=0.1", "vae.disc_start=1"],
}


@pytest.fixture(scope="module")
def base():
    """The bundled demo model: trained weights, so the network is well conditioned at 32 px (random tiny
    models with 1x1 feature maps amplify rounding through GroupNorm of a few values)."""
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled demo model is not installed")
    return path


def _overrides(out: Path, base: Path, mode: str) -> list[str]:
    if mode == "buckets":  # aspect-ratio buckets: batches of 3 and 1 images, so one rank's share is empty
        data = out.parent / "bucket-data"
        if not data.is_dir():
            data.mkdir()
            for i, (size, colour) in enumerate(
                [((32, 32), "red"), ((32, 32), "blue"), ((40, 40), "green"), ((64, 24), "white")]
            ):
                Image.new("RGB", size, colour).save(data / f"{i}.png")
                (data / f"{i}.txt").write_text(f"a {colour} picture, plain")
        extra = ['data.kind="folder"', f'data.path="{data}"', "data.buckets=true", "data.bucket_step=8", "steps=2"]
        return [f'output="{out}"', f'model.base="{base}"', *COMMON, "ema_decay=0", *extra]
    return [f'output="{out}"', f'model.base="{base}"', *COMMON, *MODES[mode]]


def _torchrun(n: int, *command: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` (what the torchrun script runs) on 127.0.0.1 with n processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--nnodes=1"]
    args += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", *command]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _compare(a: dict, b: dict, exact: bool = False) -> float:
    """Assert a and b hold the same tensors (exactly, or within ATOL/RTOL); returns the largest difference."""
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)


def _result(out: Path, mode: str) -> dict:
    names = {
        "diffusion": "model.safetensors",
        "buckets": "model.safetensors",
        "lora": "lora.safetensors",
        "embedding": "zq.safetensors",
    }
    name = names.get(mode, "vae.safetensors")
    return load_file(out / name)


def test_two_processes_equal_one_and_resume_is_exact(tmp_path, base, record_property):
    # one launch: the four modes to the end, and the diffusion run stopped after 1 of its 2 steps
    jobs = [{"overrides": _overrides(tmp_path / f"ddp-{m}", base, m)} for m in [*MODES, "buckets"]]
    jobs.append({"overrides": _overrides(tmp_path / "resumed", base, "diffusion"), "stop_after": 1})
    _torchrun(2, str(TESTS / "ddp_worker.py"), json.dumps(jobs))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    # the command users run, resuming from the state the interrupted launch left (rank 0 reports)
    script = Path(sys.executable).with_name("latentforge")  # the documented `torchrun --no-python latentforge`
    command = ["--no-python", str(script)] if script.is_file() else ["-m", "latentforge.cli"]
    done = _torchrun(2, *command, "train", *_overrides(tmp_path / "resumed", base, "diffusion"))
    assert done.stdout.strip() == str(tmp_path / "resumed" / "model.safetensors")  # printed once
    printed = [float(x) for x in re.findall(r"step \d+/2\s+loss (\d+\.\d+)", done.stderr)]
    assert len(printed) == 1  # step 2, the one of this launch, reported by rank 0 only
    _compare(_result(tmp_path / "resumed", "diffusion"), _result(tmp_path / "ddp-diffusion", "diffusion"), True)
    _compare(
        load_file(tmp_path / "resumed/state/state.safetensors"),
        load_file(tmp_path / "ddp-diffusion/state/state.safetensors"),
        True,
    )

    for mode in [*MODES, "buckets"]:  # one process, the same global batch
        cfg, losses = load_config(None, _overrides(tmp_path / f"one-{mode}", base, mode)), []
        if mode == "diffusion":  # stopped and resumed as the 2-process run, so the smoothed losses compare
            train(cfg, stop_after=1)
        train(cfg, losses.append)
        record_property(
            f"{mode} result", _compare(_result(tmp_path / f"ddp-{mode}", mode), _result(tmp_path / f"one-{mode}", mode))
        )
        ddp_state = load_file(tmp_path / f"ddp-{mode}/state/state.safetensors")
        record_property(
            f"{mode} state", _compare(ddp_state, load_file(tmp_path / f"one-{mode}/state/state.safetensors"))
        )
        if mode == "diffusion":  # the reported loss is the global batch's mean (smoothed), not a rank's share
            assert printed == pytest.approx([round(p.loss, 4) for p in losses], abs=6e-5)


def _launched(monkeypatch, world: int = 2, rank: int = 0, local: int = 0) -> None:
    """torchrun's environment without a rendezvous: anything that tried to connect would fail."""
    for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", local)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MASTER_ADDR", raising=False)


def test_a_batch_that_does_not_divide_by_the_processes_is_refused_before_connecting(monkeypatch, tmp_path, capsys):
    from latentforge.cli import main

    _launched(monkeypatch, world=2, rank=1)
    with pytest.raises(
        ConfigError, match=r"'batch_size' = 5 is the global batch .* processes \(2.*batch_size = 4 or 6"
    ):
        train(load_config(None, [f'output="{tmp_path}"', 'data.kind="synthetic"', "batch_size=5"]))
    _launched(monkeypatch, world=4)
    assert main(["train", f'output="{tmp_path}"', 'data.kind="synthetic"', "batch_size=2"]) == 2
    assert "batch_size = 4, or another process count" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was made


def test_launch_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_environment() is None
    _launched(monkeypatch, world=3, rank=2, local=1)
    assert launch_environment() == (2, 3, 1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' is not an integer"):
        launch_environment()
    _launched(monkeypatch, world=2, rank=2)
    with pytest.raises(ConfigError, match=r"RANK=2, WORLD_SIZE=2"):
        launch_environment()
    _launched(monkeypatch)
    gpu = load_config(None, ['device="cuda:0"', 'data.kind="synthetic"', "batch_size=4"])
    with pytest.raises(ConfigError, match=r"'device' = 'cuda:0' names one GPU for all 2 processes"):
        setup(gpu)


def test_the_ranks_parts_cover_each_batch_once():
    for world in (1, 2, 3, 4):
        for count in range(10):
            parts = [Distributed(rank=r, world=world).part(count) for r in range(world)]
            assert [i for p in parts for i in range(count)[p]] == list(range(count))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_the_parts_losses_and_gradients_add_up_to_the_whole_batch(base):
    """What each rank computes: its slice of the same draws, normalised by the whole batch; the sum over
    the slices is the one-process loss (the mean over the batch) and its gradient."""
    pipe = latentforge.load(base, dtype=torch.float32)
    cfg = load_config(None, [f'model.base="{base}"', *COMMON, 'model.objective="eps"'])
    denoiser = ModelDenoiser(pipe.unet, pipe.noise_schedule(), "eps")
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "", "a blue square on a green background", "a green triangle"]
    params = list(pipe.unet.requires_grad_(True).parameters())

    def run(parts):
        pipe.unet.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            loss = diffusion_loss(pipe, denoiser, x0, captions, deterministic_generator(5, 1, 0), cfg, None, None, part)
            loss.backward()
            total += float(loss.detach())
        return total, torch.cat([p.grad.flatten() for p in params])

    whole, g_whole = run([None])
    split, g_split = run([slice(0, 1), slice(1, 3), slice(3, 4)])
    assert split == pytest.approx(whole, rel=1e-6)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-5 * float(g_whole.abs().max()))
    one, _ = run([slice(0, 1)])
    assert one != pytest.approx(whole / 4, rel=1e-3)  # the examples differ: each part counts
