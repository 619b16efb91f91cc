"""Helpers shared by the benchmarks: child-process measurements, tables and JSON results."""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0]
        info["cpu_bf16"] = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
        model = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else "?"
    except (OSError, IndexError):
        pass
    return info


def run_child(code: str, timeout: float = 3600, env: dict[str, str | None] | None = None) -> dict:
    """Run ``code`` in a fresh Python process; it must print one JSON object as its last line. ``env``:
    variables to set (a None value removes the variable) on top of this process's environment."""
    start = time.perf_counter()
    child_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            child_env.pop(k, None)
        else:
            child_env[k] = v
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode == -9 else f"exit status {proc.returncode}"
        raise RuntimeError(f"benchmark child failed: {why}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("wall_s", time.perf_counter() - start)
    return result


_WRITE_SD15 = """
import torch, json
from latentforge.families import get_family
from latentforge.models import UNet, AutoencoderKL, CLIPTextModel, CLIPTokenizer
from latentforge.pipeline import Pipeline
torch.manual_seed(0)
fam = get_family("sd1")
dtype = getattr(torch, "{dtype}")
spec = fam.text[0]
pipe = Pipeline(fam, "eps", UNet(fam.unet).to(dtype), AutoencoderKL(fam.vae, fam.latent_scale).to(dtype),
                (CLIPTextModel(spec.config).to(dtype),), (CLIPTokenizer(pad_id=spec.pad_id),))
pipe.save("{single}", overwrite=True)
if {diffusers}:
    pipe.save("{folder}", layout="diffusers", overwrite=True)
print(json.dumps({{"ok": True}}))
"""


def random_sd15(workdir: Path, dtype: str = "fp32", diffusers: bool = True) -> tuple[Path, Path]:
    """The random-weight SD1.5-shaped model of the full-size benchmarks (torch seed 0; speed does not depend
    on the weights): ``workdir/sd15-{dtype}.safetensors`` and, with ``diffusers``, the diffusers folder
    ``workdir/sd15-{dtype}-diffusers``; written by a child process unless they are there already."""
    workdir.mkdir(parents=True, exist_ok=True)
    single, folder = workdir / f"sd15-{dtype}.safetensors", workdir / f"sd15-{dtype}-diffusers"
    if not single.exists() or (diffusers and not folder.exists()):
        print(f"writing a random SD1.5-shaped checkpoint ({dtype}) to {workdir} ...", flush=True)
        torch_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
        run_child(_WRITE_SD15.format(dtype=torch_dtype, single=single, folder=folder, diffusers=diffusers))
    return single, folder


def txt2img_images(workdir: Path, size: int, steps: int, variants: dict[str, tuple[str | None, dict]]) -> dict:
    """A ``steps``-step txt2img image (seed 3, 'a photo of a cat', ``size`` px) of the random SD1.5 model
    for each variant name -> (dtype or None for the default, environment), each in a fresh process; the
    images as float64 arrays."""
    import numpy as np

    _, folder = random_sd15(workdir)
    code = (
        "import json, numpy as np, latentforge\n"
        f"pipe = latentforge.load({str(folder)!r}, dtype=DTYPE)\n"
        f"im = pipe.txt2img('a photo of a cat', steps={steps}, seed=3, width={size}, height={size}).images[0]\n"
        "np.save(OUT, np.asarray(im)); print(json.dumps({}))"
    )
    images = {}
    for name, (dtype, env) in variants.items():
        out = workdir / f"psnr-{name}.npy"
        run_child(code.replace("DTYPE", repr(dtype)).replace("OUT", repr(str(out))), env=env)
        images[name] = np.load(out).astype(np.float64)
    return images


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images (arrays), in dB."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * math.log10(255**2 / mse))


# Measures peak resident memory of the child above its baseline after imports (ru_maxrss is in KiB).
PEAK_RSS = """
import resource, psutil, json
def rss_now():
    return psutil.Process().memory_info().rss
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def times(fn, reps):
    """Seconds of each of ``reps`` calls of ``fn`` after one warm-up call (also sent to children)."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# Code for benchmark children: time `reps` runs after a warm-up (mean seconds), count FLOPs once.
TIMER = (
    PEAK_RSS
    + """
import time, torch
from torch.utils.flop_counter import FlopCounterMode
def timed(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t) / reps, out
"""
    + inspect.getsource(times)
    + """
def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
"""
)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    return path
