"""Peak resident memory and time of loading a full-size SD1.5-shaped checkpoint, latentforge vs diffusers.

    python benchmarks/load_memory.py [--dtype fp16|fp32] [--workdir DIR]

Writes a random-weight SD1.5 checkpoint (single file and diffusers folder) once, then loads it in fresh
processes and reports peak RSS above the process's baseline after imports, against the size of the
loaded weights, at the end of loading and after every weight has been read once (diffusers leaves
safetensors weights memory-mapped, so its pages become resident at first use rather than at load).
Target: latentforge's single-file load at most about 1.3x the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PEAK_RSS, random_sd15, run_child, save, table

LOAD_OURS = (
    PEAK_RSS
    + """
import time, torch, latentforge
base = rss_now(); t = time.perf_counter()
pipe = latentforge.load("{path}", dtype="{dtype}")
sec = time.perf_counter() - t
params = [p for m in (pipe.unet, pipe.vae, *pipe.text_encoders) for p in m.parameters()]
weights = sum(p.numel() * p.element_size() for p in params)
at_load = peak() - base
for p in params:
    p.float().sum()  # first use: every page of every weight resident
print(json.dumps({{"peak": at_load, "used": peak() - base, "weights": weights, "seconds": sec}}))
"""
)

LOAD_DIFFUSERS = (
    PEAK_RSS
    + """
import time, torch, diffusers
base = rss_now(); t = time.perf_counter()
pipe = diffusers.StableDiffusionPipeline.from_pretrained("{path}", torch_dtype=torch.{tdtype}, safety_checker=None)
sec = time.perf_counter() - t
params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
weights = sum(p.numel() * p.element_size() for p in params)
at_load = peak() - base
for p in params:
    p.float().sum()  # first use: every page of every weight resident
print(json.dumps({{"peak": at_load, "used": peak() - base, "weights": weights, "seconds": sec}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    args = ap.parse_args()
    tdtype = {"fp16": "float16", "fp32": "float32"}[args.dtype]
    single, folder = random_sd15(args.workdir, args.dtype)
    rows = []
    for name, code, path in [
        ("latentforge", LOAD_OURS, single),
        ("latentforge", LOAD_OURS, folder),
        ("diffusers", LOAD_DIFFUSERS, folder),
    ]:
        r = run_child(code.format(path=path, dtype=args.dtype, tdtype=tdtype))
        rows.append(
            {
                "loader": name,
                "layout": "single-file" if path == single else "diffusers",
                "dtype": args.dtype,
                "weights_GB": r["weights"] / 1e9,
                "peak_above_baseline_GB": r["peak"] / 1e9,
                "peak_over_weights": r["peak"] / r["weights"],
                "after_first_use_GB": r["used"] / 1e9,
                "load_s": r["seconds"],
            }
        )
    cols = [
        "loader",
        "layout",
        "dtype",
        "weights_GB",
        "peak_above_baseline_GB",
        "peak_over_weights",
        "after_first_use_GB",
        "load_s",
    ]
    print(table(rows, cols))
    print(f"saved {save(f'load_memory_{args.dtype}', {'rows': rows})}")


if __name__ == "__main__":
    main()
