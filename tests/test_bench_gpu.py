"""benchmarks/bench_gpu.py, the prepared GPU run of issue 16, checked on the CPU with the tiny models: it is run
only when a session is lent a GPU, with minutes of device time, so it must work the first time there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_bench_gpu_runs_both_families_and_the_libraries_agree(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu"]
    cmd += ["--parts", "sd15,sdxl", "--images", "1", "--reps", "1", "--no-psnr"]
    cmd += ["--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    assert results["errors"] == {} and results["skipped"] == []
    for part in ("sd15", "sdxl"):
        got = results["parts"][part]
        # the same random weights in both libraries (fp32 on the CPU): the UNet outputs agree
        assert got["quality"]["unet_rel_rms_vs_diffusers"] < 1e-4, (part, got["quality"])
        for lib in ("latentforge", "diffusers"):
            row = got["rows"][lib]
            assert row["its"] > 0 and row["image_s"] > 0 and row["unet_step_s"] > 0 and row["vae_decode_s"] > 0
            assert row["unet_dtype"] == "torch.float32"


def test_profile_step_runs_each_check(tmp_path):
    """benchmarks/profile_step.py, the diagnostic of the GPU step (host waits, GroupNorm, layouts), with the
    tiny models on the CPU: each mode prints its figures."""
    script = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    expected = {
        "--group-norm": ["group norm (2, 320, 128, 128)", "max |diff|"],
        "--layout": ["layout torch.channels_last: unet step", "layout: unet max |diff|"],
        "--steps=3": ["unet alone, synchronized each call", "Euler step, synchronized each step", "aten::"],
    }
    for flag, lines in expected.items():
        cmd = [*script, flag] if flag == "--group-norm" else [*script, "--tiny", flag]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for line in lines:
            assert line in proc.stdout, (flag, line, proc.stdout[-2000:])
