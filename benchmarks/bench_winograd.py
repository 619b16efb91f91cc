"""Winograd F(2x2, 3x3) convolutions (nn/winograd.py) against oneDNN's direct bf16 convolution.

    python benchmarks/bench_winograd.py [--reps 4] [--no-unet] [--psnr 512] [--steps 10] [--loops] [--filters]

Three parts, one process each where it matters (and a fourth on request):
- every 3x3 convolution shape of an SD1.5 CFG step at 512x512 (batch 2, bf16, channels-last): oneDNN with
  its weight packed once (``LATENTFORGE_WINOGRAD=off``'s path) and Winograd, interleaved, the minimum of
  ``--reps``, with each one's relative RMS error against the float64 convolution;
- one CFG step of the full-size random SD1.5 UNet inside ``packed_session`` (as a generation runs it) with
  Winograd off and on, alternating, and the relative RMS difference of the outputs from the fp32 UNet's;
- ``--psnr SIZE``: a ``--steps``-step txt2img image of bench_openvino's random SD1.5 model at SIZE px, in
  fresh processes: fp32, bf16 default (Winograd on) and bf16 with ``LATENTFORGE_WINOGRAD=off``; PSNR of
  each bf16 image against the fp32 one (issue 16's bar for the default path: 40 dB);
- ``--loops``: the kernel's two loop orders (``kernels/winograd_bf16.cpp``: few tiles and many filters, or
  many tiles) and its automatic choice on every shape, with the caches evicted before each call (a 96 MB
  buffer written), as inside a UNet step where the filters were last read a step ago; the median of
  ``--reps`` + 3 interleaved calls, the results checked to be the same bits, and the totals per CFG step;
- ``--tile-sizes``: why the kernel stays at F(2x2, 3x3): the relative RMS error against float64 of
  F(m x m, 3x3) for m = 2, 3, 4 (Cook-Toom matrices from the interpolation points, B^T solved for exactly)
  with the transformed tiles and filters rounded to bf16 as the kernel would, in float64 otherwise, on
  SiLU-like activations, next to oneDNN-like direct bf16 (fp32 sums, one rounding);
- ``--filters``: making the transformed filters of all those convolutions into fresh memory, as each
  generation does: seconds and minor page faults against the number of 4 KiB pages written;
- ``--fp32``: the fp32 path (``winograd.conv3x3_fp32``, PyTorch ops, for CPUs without native bf16) against
  oneDNN's fp32 convolution with its weight packed once, on the SD1.5 UNet's shapes above and at the 8x8
  level (batch 2) and
  the SD VAE decoder's at 512 px (batch 1), interleaved, the minimum of ``--reps``, with which of them
  ``winograd.usable`` sends to Winograd by default (``--fp32`` alone: ``--no-shapes --no-unet`` implied).
Results: stdout and benchmarks/results/winograd.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import psnr, save, table, times, txt2img_images

# (in, out, feature map side) of the SD1.5 UNet's 3x3 stride-1 convolutions at 512 px, with their count
SHAPES = [
    (320, 320, 64, 7), (640, 320, 64, 2), (960, 320, 64, 1), (640, 640, 64, 1),
    (320, 640, 32, 1), (640, 640, 32, 6), (960, 640, 32, 1), (1280, 640, 32, 1), (1920, 640, 32, 1),
    (1280, 1280, 32, 1), (640, 1280, 16, 1), (1280, 1280, 16, 7), (1920, 1280, 16, 1), (2560, 1280, 16, 2),
]  # fmt: skip


def best(fn, reps):
    return min(times(fn, reps))


def shapes(reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from latentforge.nn.packed import pack_weights

    rows = []
    for cin, cout, side, count in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(torch.bfloat16).to(memory_format=torch.channels_last)
        x = torch.randn(2, cin, side, side).to(torch.bfloat16).to(memory_format=torch.channels_last)
        pack_weights(conv)
        with torch.inference_mode():
            ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            times, errs = {}, {}
            for _ in range(2):
                for mode in ("off", "on"):
                    os.environ["LATENTFORGE_WINOGRAD"] = mode
                    out = conv(x)
                    errs[mode] = float((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
                    times[mode] = min(times.get(mode, 1e9), best(lambda conv=conv, x=x: conv(x), reps))
        os.environ.pop("LATENTFORGE_WINOGRAD")
        flops = 2.0 * 2 * side * side * cin * cout * 9
        rows.append({
            "shape": f"{cin}->{cout} @{side}", "per step": count, "onednn ms": times["off"] * 1e3,
            "winograd ms": times["on"] * 1e3, "speedup": times["off"] / times["on"],
            "onednn GFLOP/s": flops / times["off"] / 1e9, "onednn err": errs["off"], "winograd err": errs["on"],
        })  # fmt: skip
    print(table(rows, list(rows[0])), flush=True)
    total = {m: sum(r[f"{m} ms"] * r["per step"] for r in rows) for m in ("onednn", "winograd")}
    print(f"per CFG step: oneDNN {total['onednn']:.0f} ms, Winograd {total['winograd']:.0f} ms", flush=True)
    return rows


# (in, out, feature map side, count) of the SD VAE decoder's 3x3 stride-1 convolutions at 512 px
# the SD1.5 UNet's 3x3 stride-1 convolutions at the 8x8 level (512 px), for the fp32 comparison
SHAPES_8X8 = [(1280, 1280, 8, 11), (2560, 1280, 8, 3)]
VAE_SHAPES = [(512, 512, 64, 7), (512, 512, 128, 6), (512, 256, 256, 1), (256, 256, 256, 5), (256, 128, 512, 1),
              (128, 128, 512, 5)]  # fmt: skip


def shapes_fp32(reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from latentforge.nn import winograd
    from latentforge.nn.packed import pack_weights

    rows = []
    cases = [(cin, cout, side, count, 2) for cin, cout, side, count in SHAPES + SHAPES_8X8]
    cases += [(cin, cout, side, count, 1) for cin, cout, side, count in VAE_SHAPES]
    for cin, cout, side, count, n in cases:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last).requires_grad_(False)
        x = torch.randn(n, cin, side, side).to(memory_format=torch.channels_last)
        auto = winograd.usable(conv, x)
        pack_weights(conv)
        with torch.inference_mode():
            ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            outs, best_s = {}, {}
            os.environ["LATENTFORGE_WINOGRAD"] = "off"
            fns = {
                "onednn": lambda conv=conv, x=x: conv(x),
                "winograd": lambda conv=conv, x=x: winograd.conv3x3_fp32(x, conv.weight, conv.bias),
            }
            for _ in range(2):
                for name, fn in fns.items():
                    outs[name] = fn()
                    best_s[name] = min(best_s.get(name, 1e9), best(fn, reps))
            os.environ.pop("LATENTFORGE_WINOGRAD")
        err = {k: float((v.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) for k, v in outs.items()}
        rows.append({
            "shape": f"{n}x{cin}->{cout} @{side}", "count": count, "onednn ms": best_s["onednn"] * 1e3,
            "winograd ms": best_s["winograd"] * 1e3, "speedup": best_s["onednn"] / best_s["winograd"],
            "by default": "winograd" if auto else "onednn", "onednn err": err["onednn"],
            "winograd err": err["winograd"],
        })  # fmt: skip
    print(table(rows, list(rows[0])), flush=True)
    for part, n in (("UNet CFG step", 2), ("VAE decode", 1)):
        sel = [r for r in rows if r["shape"].startswith(f"{n}x")]
        plain = sum(r["onednn ms"] * r["count"] for r in sel)
        chosen = sum(r[f"{'winograd' if r['by default'] == 'winograd' else 'onednn'} ms"] * r["count"] for r in sel)
        print(f"{part}, 3x3 convolutions: oneDNN {plain:.0f} ms, as chosen by default {chosen:.0f} ms", flush=True)
    return rows


def loops(reps: int) -> list[dict]:
    import torch

    from latentforge.nn import native, winograd

    names = list(native.WINOGRAD_LOOPS)
    evict = torch.empty(96 << 20, dtype=torch.uint8)
    rows = []
    for cin, cout, side, count in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(2, cin, side, side).to(torch.bfloat16).to(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3) / (3 * cin**0.5)).to(torch.bfloat16)
        bias = torch.randn(cout).to(torch.bfloat16)
        u = winograd.transform(w)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        outs = {}
        with torch.inference_mode():
            for rep in range(reps + 3):
                for name in names:
                    native.winograd_loop(name)
                    evict.fill_(rep)
                    t = time.perf_counter()
                    outs[name] = winograd.conv3x3(x, u, bias, cout)
                    seconds[name].append(time.perf_counter() - t)
        native.winograd_loop("auto")
        if not all(torch.equal(outs[n], outs["auto"]) for n in names):
            raise SystemExit(f"the loops differ on {cin}->{cout} @{side}")
        row = {"shape": f"{cin}->{cout} @{side}", "per step": count}
        row.update({f"{n} ms": statistics.median(seconds[n]) * 1e3 for n in names})
        row["auto / many-tiles"] = row["auto ms"] / row["many-tiles ms"]
        rows.append(row)
    print(table(rows, list(rows[0])), flush=True)
    total = {n: sum(r[f"{n} ms"] * r["per step"] for r in rows) for n in names}
    print("per CFG step, caches cold:", ", ".join(f"{n} {v:.0f} ms" for n, v in total.items()), flush=True)
    return rows


def cook_toom(m: int, points: list[float]):
    """(B^T, G, A^T) of F(m, 3) from m + 1 finite interpolation points and infinity (Lavin & Gray 2016):
    A^T and G from the points, B^T the solution of sum_j A^T[i,j] G[j,k] B^T[j,s] = [s == i + k]."""
    import math

    import torch

    n, r = m + 2, 3
    at = torch.zeros(m, n, dtype=torch.float64)
    g = torch.zeros(n, r, dtype=torch.float64)
    for j, p in enumerate(points):
        f = math.prod(p - q for q in points if q != p)
        at[:, j] = torch.tensor([p**i for i in range(m)], dtype=torch.float64)
        g[j] = torch.tensor([p**k / f for k in range(r)], dtype=torch.float64)
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    rows = torch.zeros(m * r * n, n * n, dtype=torch.float64)
    rhs = torch.zeros(m * r * n, dtype=torch.float64)
    for e, (i, k, s) in enumerate((i, k, s) for i in range(m) for k in range(r) for s in range(n)):
        rows[e, torch.arange(n) * n + s] = at[i] * g[:, k]
        rhs[e] = float(s == i + k)
    bt = torch.linalg.lstsq(rows, rhs).solution.view(n, n)
    if (rows @ bt.flatten() - rhs).abs().max() > 1e-9:
        raise RuntimeError(f"no exact F({m}, 3) for the points {points}")
    return bt, g, at


def tile_sizes() -> list[dict]:
    import torch
    import torch.nn.functional as F

    def winograd_conv(x, w, bt, g, at, rounded=True):
        m, a = at.shape[0], bt.shape[0]
        n, _, h, wd = x.shape
        th, tw = -(-h // m), -(-wd // m)
        tiles = F.pad(x.double(), (1, a - 2 + m * tw - wd, 1, a - 2 + m * th - h)).unfold(2, a, m).unfold(3, a, m)
        v, u = bt @ tiles @ bt.T, g @ w.double() @ g.T
        if rounded:
            v, u = v.bfloat16().double(), u.bfloat16().double()
        y = at @ torch.einsum("nctsij,ocij->notsij", v, u) @ at.T
        return y.permute(0, 1, 2, 4, 3, 5).reshape(n, w.shape[0], m * th, m * tw)[:, :, :h, :wd]

    def rel(a, b):
        return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())

    torch.manual_seed(0)
    x = F.silu(torch.randn(2, 128, 24, 24)).bfloat16()
    w = (torch.randn(64, 128, 3, 3) / (3 * 128**0.5)).bfloat16()
    exact = F.conv2d(x.double(), w.double(), padding=1)
    rows = [{"method": "direct bf16 (fp32 sums)", "products per output": 9.0,
             "rel RMS error": rel(F.conv2d(x.float(), w.float(), padding=1).bfloat16().double(), exact)}]  # fmt: skip
    for m, points in [(2, [0, 1, -1]), (3, [0, 1, -1, 2]), (3, [0, 1, -1, 0.5]), (4, [0, 1, -1, 2, -2]),
                      (4, [0, 1, -1, 2, -0.5]), (4, [0, 1, -1, 0.5, -0.5])]:  # fmt: skip
        bt, g, at = cook_toom(m, points)
        if rel(winograd_conv(x, w, bt, g, at, rounded=False), exact) > 1e-12:
            raise RuntimeError(f"F({m}, 3) on {points} is not the convolution")
        rows.append({"method": f"F({m}x{m}, 3x3) points {points}, inf", "products per output": (m + 2) ** 2 / m**2,
                     "rel RMS error": rel(winograd_conv(x, w, bt, g, at), exact)})  # fmt: skip
    print(table(rows, list(rows[0])), flush=True)
    return rows


def unet_step(reps: int) -> dict:
    import torch

    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import UNet
    from latentforge.nn.packed import packed_session

    torch.manual_seed(0)
    model = to_fast_layout(UNet(get_family("sd1").unet).eval())
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768)
    res: dict = {}
    with torch.inference_mode():
        ref = model(x, t, ctx).double()
        model.to(torch.bfloat16)
        xb, cb = x.bfloat16(), ctx.bfloat16()
        for _ in range(2):
            for mode in ("off", "auto"):
                os.environ["LATENTFORGE_WINOGRAD"] = mode
                with packed_session(model, repeated=True):  # as a generation runs it
                    out = model(xb, t, cb)
                    s = best(lambda: model(xb, t, cb), reps)
                res[f"{mode} s"] = min(res.get(f"{mode} s", 1e9), s)
                res[f"{mode} rel err vs fp32"] = float(
                    (out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
                )
    os.environ.pop("LATENTFORGE_WINOGRAD")
    res["speedup"] = res["off s"] / res["auto s"]
    print("SD1.5 UNet CFG step 512:", {k: round(v, 4) for k, v in res.items()}, flush=True)
    return res


def filters(reps: int) -> dict:
    """Making the transformed filters of every SHAPES convolution into fresh memory, as each generation
    does (``nn.native.winograd_filters``): seconds (median of ``reps``), minor page faults, GB written."""
    import resource

    import torch

    from latentforge.nn import native

    torch.manual_seed(0)
    weights = [
        torch.randn(cout, cin, 3, 3).to(torch.bfloat16, memory_format=torch.channels_last)
        for cin, cout, _, count in SHAPES
        for _ in range(count)
    ]
    seconds, faults = [], []
    for _ in range(reps + 1):  # the first builds or loads the kernels
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        us = [native.winograd_filters(w) for w in weights]
        seconds.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt)
        gb = sum(u.numel() * u.element_size() for u in us) / 1e9
        del us
    res = {"filters GB": gb, "median s": statistics.median(seconds[1:]), "page faults": faults[-1]}
    res["pages of 4 KiB"] = int(gb * 1e9 / 4096)
    print("Winograd filters of an SD1.5 step's 3x3 convolutions:", {k: round(v, 3) for k, v in res.items()})
    return res


def image_psnr(workdir: Path, size: int, steps: int) -> dict:
    images = txt2img_images(
        workdir,
        size,
        steps,
        {
            "fp32": ("fp32", {}),
            "winograd": (None, {"LATENTFORGE_WINOGRAD": "auto"}),
            "direct": (None, {"LATENTFORGE_WINOGRAD": "off"}),
        },
    )
    result = {
        "size": size,
        "steps": steps,
        "bf16 Winograd (default) vs fp32 dB": psnr(images["winograd"], images["fp32"]),
        "bf16 direct vs fp32 dB": psnr(images["direct"], images["fp32"]),
        "Winograd vs direct dB": psnr(images["winograd"], images["direct"]),
    }
    print(result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--no-unet", action="store_true")
    ap.add_argument("--psnr", type=int, metavar="SIZE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--loops", action="store_true", help="time the kernel's two loop orders, caches cold")
    ap.add_argument("--tile-sizes", action="store_true", help="bf16 error of F(2x2), F(3x3), F(4x4) tiles")
    ap.add_argument("--filters", action="store_true", help="seconds and page faults of making the filters")
    ap.add_argument("--fp32", action="store_true", help="the fp32 path (PyTorch ops) against oneDNN's fp32")
    args = ap.parse_args()
    payload: dict = {}
    if args.fp32:
        args.no_shapes = args.no_unet = True
        payload["fp32 shapes"] = shapes_fp32(args.reps)
    if not args.no_shapes:
        payload["shapes"] = shapes(args.reps)
    if not args.no_unet:
        payload["unet"] = unet_step(max(2, args.reps // 2))
    if args.loops:
        payload["loops"] = loops(args.reps)
    if args.tile_sizes:
        payload["tile sizes"] = tile_sizes()
    if args.filters:
        payload["filters"] = filters(args.reps)
    if args.psnr:
        payload["psnr"] = image_psnr(args.workdir, args.psnr, args.steps)
    print(f"saved {save('winograd', payload)}")


if __name__ == "__main__":
    main()
