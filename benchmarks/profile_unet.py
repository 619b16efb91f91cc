"""Where one CFG step of the SD1.5 UNet spends its time: share and GFLOP/s by kind of operation.

    python benchmarks/profile_unet.py [--size 512] [--dtype bf16]

Builds the full-size SD1.5 UNet with random weights on latentforge's fast path (channels-last), runs
one warm-up and one profiled CFG step (batch 2) under torch.profiler inside ``packed_session`` (as a
generation runs it), and groups the CPU time of the operators into attention (SDPA or latentforge's
kernel), convolution, linear/matmul (with GEGLU's fused oneDNN matmuls), the GroupNorm + SiLU kernel, the
Winograd convolutions (input transform and products; GFLOP/s counted as the direct convolution's) and
everything else. The native kernels are ctypes calls the profiler cannot see: this script labels them
with ``record_function``. FLOPs come from the profiler for convolutions and matmuls and from the shapes
for attention (4*B*H*L*S*D). ``--vae`` profiles a VAE decode at the same size instead.
Saves results/profile_unet.json (results/profile_vae.json).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table

KINDS = {
    "attention (SDPA)": ("scaled_dot_product", "flash_attention"),
    "attention (native)": ("lf_attention",),
    "GroupNorm + SiLU (native)": ("lf_groupnorm",),
    "convolution (Winograd, native)": ("lf_winograd",),
    "convolution": ("convolution", "mkldnn_convolution", "conv2d", "_convolution_pointwise"),
    "linear / matmul": ("addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "_linear_pointwise"),
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


NATIVE_ATTENTION_FLOPS = [0.0]  # counted by the labelled attention kernel while profiling
# the Winograd convolutions' FLOPs counted as the direct convolution's (2 * N*H*W * Cout * C * 9): the
# products it saves count as done, as for the GFLOP/s of a whole step
WINOGRAD_FLOPS = [0.0]


def label_native_kernels() -> None:
    """Wrap nn.native's kernel calls in profiler labels (lf_attention, lf_groupnorm, lf_winograd_*); the
    attention label also counts its FLOPs (4*B*Nq*Nk*C), the Winograd convolution its direct FLOPs."""
    from latentforge.nn import native

    def labelled(fn, name):
        def call(*args, **kwargs):
            if name == "lf_attention":
                (b, nq, c), nk = args[0].shape, args[1].shape[1]
                NATIVE_ATTENTION_FLOPS[0] += 4.0 * b * nq * nk * c
            elif name == "lf_winograd_conv":  # (v, u, bias, out, in_channels, rows): out rows 2*(ty1 - ty0)
                out, c, (ty0, ty1) = args[3], args[4], args[5]
                n, cout, h, w = out.shape
                rows = min(h, 2 * ty1) - 2 * ty0
                WINOGRAD_FLOPS[0] += 2.0 * n * rows * w * cout * c * 9
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return call

    for attr, name in (
        ("attention_bf16", "lf_attention"),
        ("group_norm_bf16", "lf_groupnorm"),
        ("winograd_input", "lf_winograd_input"),
        ("winograd_conv", "lf_winograd_conv"),
        ("winograd_filters", "lf_winograd_filters"),
    ):
        setattr(native, attr, labelled(getattr(native, attr), name))
    # the fp32 kernels for AVX2 CPUs (nn/native_avx2.py): the same labels; the fp32 Winograd convolution's
    # products and filter transform are PyTorch ops (bmm, matmul), told apart by their 16 positions
    from latentforge.nn import native_avx2, winograd

    for attr, name in (
        ("attention_fp32", "lf_attention"),
        ("group_norm_affine", "lf_groupnorm"),
        ("winograd_input", "lf_winograd_input"),
        ("winograd_output", "lf_winograd_output"),
        ("linear_geglu_fp32", "lf_geglu"),
    ):
        setattr(native_avx2, attr, labelled(getattr(native_avx2, attr), name))
    direct = winograd.conv3x3_fp32

    def conv3x3_fp32(x, weight, *args, **kwargs):
        n, c, h, w = x.shape
        WINOGRAD_FLOPS[0] += 2.0 * n * h * w * weight.shape[0] * c * 9
        return direct(x, weight, *args, **kwargs)

    winograd.conv3x3_fp32 = conv3x3_fp32


def winograd_product(e) -> bool:
    """An fp32 Winograd convolution's batched product or filter transform (``nn.winograd``): a (16, ...)
    product or the 16 x 9 transform matrix."""
    shapes = [s for s in e.input_shapes if s]
    return (
        e.key in ("aten::bmm", "aten::matmul", "aten::mm")
        and bool(shapes)
        and ((e.key == "aten::bmm" and shapes[0][0] == 16) or list(shapes[0]) == [16, 9])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--vae", action="store_true", help="profile a VAE decode instead of a UNet step")
    args = ap.parse_args()
    from latentforge import allocator
    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL, UNet
    from latentforge.nn.packed import packed_session

    label_native_kernels()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    n = args.size // 8
    if args.vae:
        model = to_fast_layout(AutoencoderKL(get_family("sd1").vae).to(dtype).eval())
        z = torch.randn(1, 4, n, n, dtype=dtype)
        call, what = (lambda: model.decode(z)), "SD VAE decode"
    else:
        model = to_fast_layout(UNet(get_family("sd1").unet).to(dtype).eval())
        x = torch.randn(2, 4, n, n, dtype=dtype)
        t = torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, dtype=dtype)
        call, what = (lambda: model(x, t, ctx)), "SD1.5 UNet, one CFG step (batch 2)"
    # as a generation runs the UNet: a packed session, freed blocks reused between steps after the first
    # (allocator.py)
    reuse = allocator.reusing() if args.vae else allocator.reusing("steps")
    with torch.inference_mode(), packed_session(model, repeated=True):
        call()
        with reuse:
            call()
            NATIVE_ATTENTION_FLOPS[0] = WINOGRAD_FLOPS[0] = 0.0
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
                call()
    events = prof.key_averages(group_by_input_shape=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    time_us = {k: 0.0 for k in [*KINDS, "other"]}
    flops = {k: 0.0 for k in time_us}
    flops["attention (native)"] = NATIVE_ATTENTION_FLOPS[0]
    flops["convolution (Winograd, native)"] = WINOGRAD_FLOPS[0]
    for e in events:
        kind = "convolution (Winograd, native)" if winograd_product(e) else kind_of(e.key)
        time_us[kind] += e.self_cpu_time_total
        if kind == "convolution (Winograd, native)":
            continue
        if "flash_attention" in e.key:  # the kernel itself (its parent SDPA call has the same shapes)
            flops[kind] += attention_flops(e.input_shapes) * e.count
        elif "_linear_pointwise" in e.key:  # oneDNN's linear (nn/fused.py): no profiler count; x (.., K), w (N, K)
            binary = len(e.input_shapes) == 5  # (x, other, w, b, attr) against (x, w, b, attr, scalars, algo)
            x_shape, w_shape = e.input_shapes[0], e.input_shapes[2 if binary else 1]
            if x_shape and len(w_shape) == 2:
                flops[kind] += 2.0 * math.prod(x_shape) * w_shape[0] * e.count
        elif kind in ("convolution", "linear / matmul"):
            flops[kind] += e.flops  # the profiler's own count (conv2d, addmm, mm, bmm); 0 for wrappers
    rows = []
    for kind, us in time_us.items():
        gflops = flops[kind] / (us / 1e6) / 1e9 if us and flops[kind] else None
        rows.append({"operation": kind, "seconds": us / 1e6, "share": us / total_us, "GFLOP/s": gflops})
    print(f"{what} at {args.size}x{args.size}, {args.dtype}, channels-last, convolutions packed")
    print(table(rows, ["operation", "seconds", "share", "GFLOP/s"]))
    others = sorted((e for e in events if kind_of(e.key) == "other"), key=lambda e: -e.self_cpu_time_total)[:8]
    print("largest 'other':", ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.3f}s" for e in others))
    name = "profile_vae" if args.vae else "profile_unet"
    print(f"saved {save(name, {'size': args.size, 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
