"""Data-parallel training (train/distributed.py): 2 gloo processes started by torchrun equal 1 process with
the same global batch, in the modes diffusion (with the text encoder, EMA, clipping, accumulation), lora
and embedding; a resumed 2-process run equals the uninterrupted one bit for bit; bad launches fail clearly.

Tolerance of the 1- vs 2-process comparison: the two runs do the same arithmetic except the order in
which the batch's gradient contributions are summed (inside the backward kernels over 4 examples, or
over 2 + 2 and then across the ranks), float32 rounding of ~1e-7 relative per step. AdamW moves each
weight by about lr per step (its update is normalised), so a wrong example, noise draw or caption
moves weights by ~lr = 1e-3 over the run; rounding moves them by orders of magnitude less. We allow
2e-5 absolute (plus 1e-4 relative): 50 times below what one wrong step would cause.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.sampling import ModelDenoiser
from latentforge.train import ConfigError, load_config, train
from latentforge.train.common import deterministic_generator
from latentforge.train.diffusion import diffusion_loss
from latentforge.train.distributed import Distributed, launch_environment

TESTS = Path(__file__).parent
SRC = Path(latentforge.__file__).parents[1]
ATOL, RTOL = 2e-5, 1e-4

COMMON = [
    'data.kind="synthetic"',
    "data.size=12",
    "data.resolution=32",
    "batch_size=4",
    "lr=1e-3",
    "lr_warmup=0",
    "save_every=0",
    "sample_every=0",
    'mixed_precision="no"',
    "log_every=1",
    "model.caption_dropout=0.25",
    "model.noise_offset=0.05",
    "model.min_snr_gamma=5",
]
MODES = {
    "diffusion": ["steps=4", "grad_accum=2", "ema_decay=0.9", "grad_clip=0.05", "model.train_text_encoder=true"],
    "lora": ['mode="lora"', "steps=2", "ema_decay=0", "lora.text_encoder=true", "lora.dropout=0.25"],
    "embedding": ['mode="embedding"', "steps=2", "ema_decay=0", 'embedding.token="zq"', "embedding.num_vectors=2"],
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
    return [f'output="{out}"', f'model.base="{base}"', *COMMON, *MODES[mode]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, *command: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` (what the torchrun script runs) on 127.0.0.1 with n processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--nnodes=1"]
    args += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", *command]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _compare(a: dict, b: dict, exact: bool = False) -> None:
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=ATOL, rtol=RTOL, msg=k)


def _result(out: Path, mode: str) -> dict:
    name = {"diffusion": "model.safetensors", "lora": "lora.safetensors", "embedding": "zq.safetensors"}[mode]
    return load_file(out / name)


def test_two_processes_equal_one_and_resume_is_exact(tmp_path, base):
    # one launch: the three modes to the end, and the diffusion run stopped after 2 of its 4 steps
    jobs = [{"overrides": _overrides(tmp_path / f"ddp-{m}", base, m)} for m in MODES]
    jobs.append({"overrides": _overrides(tmp_path / "resumed", base, "diffusion"), "stop_after": 2})
    _torchrun(2, str(TESTS / "ddp_worker.py"), json.dumps(jobs))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    # the command users run, resuming from the state the interrupted launch left (rank 0 reports)
    done = _torchrun(2, "-m", "latentforge.cli", "train", *_overrides(tmp_path / "resumed", base, "diffusion"))
    assert done.stdout.strip() == str(tmp_path / "resumed" / "model.safetensors")  # printed once
    printed = [float(x) for x in re.findall(r"step \d+/4\s+loss (\d+\.\d+)", done.stderr)]
    assert len(printed) == 2  # steps 3 and 4 of this launch, reported by rank 0 only
    _compare(_result(tmp_path / "resumed", "diffusion"), _result(tmp_path / "ddp-diffusion", "diffusion"), True)
    _compare(
        load_file(tmp_path / "resumed/state/state.safetensors"),
        load_file(tmp_path / "ddp-diffusion/state/state.safetensors"),
        True,
    )

    for mode in MODES:  # one process, the same global batch
        cfg, losses = load_config(None, _overrides(tmp_path / f"one-{mode}", base, mode)), []
        if mode == "diffusion":  # stopped and resumed as the 2-process run, so the smoothed losses compare
            train(cfg, stop_after=2)
        train(cfg, lambda p: losses.append(p.loss))
        _compare(_result(tmp_path / f"ddp-{mode}", mode), _result(tmp_path / f"one-{mode}", mode))
        ddp_state = load_file(tmp_path / f"ddp-{mode}/state/state.safetensors")
        _compare(ddp_state, load_file(tmp_path / f"one-{mode}/state/state.safetensors"))
        if mode == "diffusion":  # the reported loss is the global batch's mean (smoothed), not a rank's share
            assert printed == pytest.approx([round(x, 4) for x in losses], abs=6e-5)
