"""GEGLU fused into oneDNN matmuls (nn/fused.py) and the VAE's freed-memory reuse (allocator.py).

    python benchmarks/bench_fused.py [--reps 5] [--rounds 2] [--size 512]

1. GEGLU at SD1.5's three widths for a 512 px CFG step (tokens x 320 -> 2 x 1280, ... ), bf16: PyTorch's
   plain ops (F.linear, then the bias inside it, chunk, GELU, product) against ``fused.linear_geglu``, in
   one process, alternating, the minimum of ``--reps``; and each one's largest error against the
   float64 definition.
2. The SD VAE decode at ``--size`` px, bf16, channels-last, random weights, in fresh processes
   alternating ``LATENTFORGE_MALLOC=reuse`` and ``system`` (the default) (``--rounds`` each): seconds
   (minimum of ``--reps`` after a warm-up), minor page faults per decode and the process's peak RSS.
Results: stdout and benchmarks/results/fused.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import run_child, save, table

SHAPES = [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120)]  # (tokens, width, F) at 64, 32, 16 px

VAE_CHILD = """
import json, resource, time, torch
from latentforge.device import to_fast_layout
from latentforge.families import get_family
from latentforge.models import AutoencoderKL
torch.manual_seed(0)
vae = to_fast_layout(AutoencoderKL(get_family("sd1").vae).to(torch.bfloat16).eval())
z = torch.randn(1, 4, SIZE // 8, SIZE // 8, dtype=torch.bfloat16)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times, counts = [], []
with torch.inference_mode():
    vae.decode(z)
    for _ in range(REPS):
        f0, t0 = faults(), time.perf_counter()
        vae.decode(z)
        times.append(time.perf_counter() - t0)
        counts.append(faults() - f0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"s": min(times), "faults": min(counts), "peak_rss_GB": peak}))
"""


def geglu_rows(reps: int) -> list[dict]:
    from latentforge.nn import fused

    if not fused.available():
        print("oneDNN has no bf16 on this CPU: GEGLU stays on PyTorch's ops; skipping part 1")
        return []
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, c, f in SHAPES:
        x = torch.randn(m, c, generator=g).bfloat16()
        w = (torch.randn(2 * f, c, generator=g) * c**-0.5).bfloat16()
        b = (torch.randn(2 * f, generator=g) * 0.1).bfloat16()

        def plain(x=x, w=w, b=b):
            value, gate = F.linear(x, w, b).chunk(2, dim=-1)
            return value * F.gelu(gate)

        def ours(x=x, w=w, b=b):
            return fused.linear_geglu(x, w, b)

        h = x.double() @ w.double().T + b.double()
        value, gate = h.chunk(2, dim=-1)
        exact = value * (gate * 0.5 * (1 + torch.special.erf(gate / math.sqrt(2))))
        best = {"plain": math.inf, "fused": math.inf}
        with torch.inference_mode():
            plain(), ours()
            for _ in range(reps):
                for name, fn in (("plain", plain), ("fused", ours)):
                    t = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t)
            err = {n: (fn().double() - exact).abs().max().item() for n, fn in (("plain", plain), ("fused", ours))}
        rows.append({
            "shape": f"{m}x{c} -> 2x{f}", "plain_ms": best["plain"] * 1e3, "fused_ms": best["fused"] * 1e3,
            "speedup": best["plain"] / best["fused"], "plain_err": err["plain"], "fused_err": err["fused"],
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-vae", action="store_true")
    args = ap.parse_args()
    rows = geglu_rows(args.reps)
    if rows:
        print("GEGLU, bf16, ms (min of reps); largest error against float64")
        print(table(rows, ["shape", "plain_ms", "fused_ms", "speedup", "plain_err", "fused_err"]))
    vae: dict[str, list[dict]] = {"reuse": [], "system": []}
    if not args.no_vae:
        code = VAE_CHILD.replace("SIZE", str(args.size)).replace("REPS", str(max(1, min(args.reps, 3))))
        for _ in range(args.rounds):
            for mode in vae:
                vae[mode].append(run_child(code, env={"LATENTFORGE_MALLOC": mode}))
        vrows = [
            {"LATENTFORGE_MALLOC": mode, "decode_s": min(r["s"] for r in runs),
             "faults_per_decode": min(r["faults"] for r in runs), "peak_rss_GB": max(r["peak_rss_GB"] for r in runs)}
            for mode, runs in vae.items()
        ]  # fmt: skip
        print(f"SD VAE decode at {args.size} px, bf16 (fresh processes, {args.rounds} rounds)")
        print(table(vrows, ["LATENTFORGE_MALLOC", "decode_s", "faults_per_decode", "peak_rss_GB"]))
    print(f"saved {save('fused', {'geglu': rows, 'vae': vae})}")


if __name__ == "__main__":
    main()
