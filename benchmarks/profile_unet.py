"""Where one CFG step of the SD1.5 UNet spends its time: share and GFLOP/s by kind of operation.

    python benchmarks/profile_unet.py [--size 512] [--dtype bf16]

Builds the full-size SD1.5 UNet with random weights on latentforge's fast path (channels-last), runs
one warm-up and one profiled CFG step (batch 2) under torch.profiler, and groups the CPU time of the
operators into attention (SDPA), convolution, linear/matmul and everything else. FLOPs come from the
profiler for convolutions and matmuls and from the shapes for attention (4*B*H*L*S*D).
Saves results/profile_unet.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table

KINDS = {
    "attention (SDPA)": ("scaled_dot_product", "flash_attention"),
    "convolution": ("convolution", "mkldnn_convolution", "conv2d"),
    "linear / matmul": ("addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
}


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "other"


def attention_flops(shapes) -> float:
    q, k = shapes[0], shapes[1]
    if len(q) != 4 or len(k) != 4:
        return 0.0
    b, h, L, d = q
    return 4.0 * b * h * L * k[2] * d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import UNet

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    unet = to_fast_layout(UNet(get_family("sd1").unet).to(dtype).eval())
    n = args.size // 8
    x = torch.randn(2, 4, n, n, dtype=dtype)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, dtype=dtype)
    with torch.inference_mode():
        unet(x, t, ctx)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            unet(x, t, ctx)
    events = prof.key_averages(group_by_input_shape=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    time_us = {k: 0.0 for k in [*KINDS, "other"]}
    flops = {k: 0.0 for k in time_us}
    for e in events:
        kind = kind_of(e.key)
        time_us[kind] += e.self_cpu_time_total
        if "flash_attention" in e.key:  # the kernel itself (its parent SDPA call has the same shapes)
            flops[kind] += attention_flops(e.input_shapes) * e.count
        elif kind not in ("attention (SDPA)", "other"):
            flops[kind] += e.flops  # the profiler's own count (conv2d, addmm, mm, bmm); 0 for wrappers
    rows = []
    for kind, us in time_us.items():
        gflops = flops[kind] / (us / 1e6) / 1e9 if us and flops[kind] else None
        rows.append({"operation": kind, "seconds": us / 1e6, "share": us / total_us, "GFLOP/s": gflops})
    print(f"SD1.5 UNet, one CFG step (batch 2) at {args.size}x{args.size}, {args.dtype}, channels-last")
    print(table(rows, ["operation", "seconds", "share", "GFLOP/s"]))
    print(f"saved {save('profile_unet', {'size': args.size, 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
