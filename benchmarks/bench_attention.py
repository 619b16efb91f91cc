"""latentforge's bf16 attention kernel (nn/native.py) against PyTorch's SDPA and OpenVINO's.

    python benchmarks/bench_attention.py [--reps 5] [--threads N] [--unet] [--no-openvino]

Every attention shape of an SD1.5 CFG step at 512x512 (self- and cross-attention at each level), the
SDXL UNet's at 1024x1024 and the VAE's mid-block at 512x512, bf16, in one process: the kernel, SDPA
(``LATENTFORGE_KERNELS=off``'s path) and OpenVINO's ScaledDotProductAttention op compiled alone with
bf16 inference precision (``pip install -e '.[bench]'``; it is given fp32 inputs, its conversion
included). Interleaved rounds, the minimum of ``--reps``; GFLOP/s counts 4*B*H*Nq*Nk*D. ``--unet``
adds one CFG step of a full-size SD1.5-shaped UNet with random weights, with the kernels (attention,
GroupNorm + SiLU, and GEGLU's fused matmuls of nn/fused.py) and without (``LATENTFORGE_KERNELS=off``) in
alternation, and the largest difference of the
outputs. Results: stdout and benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, table, times

# (name, batch, queries, keys, heads, head width); cross-attention keys are the 77 context tokens
SHAPES = [
    ("sd15 64x64 self", 2, 4096, 4096, 8, 40),
    ("sd15 64x64 cross", 2, 4096, 77, 8, 40),
    ("sd15 32x32 self", 2, 1024, 1024, 8, 80),
    ("sd15 16x16 self", 2, 256, 256, 8, 160),
    ("sd15 8x8 self", 2, 64, 64, 8, 160),
    ("sdxl 64x64 self", 2, 4096, 4096, 10, 64),
    ("sdxl 32x32 self", 2, 1024, 1024, 20, 64),
    ("vae 64x64 mid", 1, 4096, 4096, 1, 512),
]


def best(fn, reps: int) -> float:
    return min(times(fn, reps))


def openvino_sdpa(b: int, nq: int, nk: int, heads: int, d: int):
    import openvino as ov
    import openvino.opset13 as ops

    params = [ops.parameter([b, heads, n, d], ov.Type.f32) for n in (nq, nk, nk)]
    model = ov.Model([ops.scaled_dot_product_attention(*params, causal=False)], params)
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--unet", action="store_true", help="also a full-size SD1.5 UNet CFG step and VAE decode, on/off")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--psnr", type=int, metavar="SIZE", help="also PSNR of a SIZE px image: kernels vs fp32, vs off")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    args = ap.parse_args()
    os.environ["LATENTFORGE_KERNELS"] = "on"
    import torch
    import torch.nn.functional as F

    from latentforge.nn import native

    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.ready():
        sys.exit("the kernel is not available here (needs AVX512-BF16 and a C++ compiler; see the log)")
    ov_ok = not args.no_openvino
    if ov_ok:
        try:
            import openvino  # noqa: F401
        except ImportError:
            ov_ok = False
            print("openvino is not installed (pip install -e '.[bench]'): its column is left out")
    rows = []
    for name, b, nq, nk, heads, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, n, heads * d, generator=g).bfloat16() for n in (nq, nk, nk))
        q4, k4, v4 = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))

        def ours(q=q, k=k, v=v, heads=heads):
            return native.attention_bf16(q, k, v, heads)

        def sdpa(q4=q4, k4=k4, v4=v4, shape=(b, nq, heads * d)):
            return F.scaled_dot_product_attention(q4, k4, v4).transpose(1, 2).reshape(shape)

        ref = sdpa().double()
        row = {"shape": name, "B,H,Nq,Nk,D": f"{b},{heads},{nq},{nk},{d}"}
        row["max diff vs sdpa"] = float((ours().double() - ref).abs().max())
        gflop = 4 * b * heads * nq * nk * d / 1e9
        row["latentforge ms"] = best(ours, args.reps) * 1e3
        row["sdpa ms"] = best(sdpa, args.reps) * 1e3
        if ov_ok:
            request = openvino_sdpa(b, nq, nk, heads, d)
            arrays = [t.float().contiguous().numpy() for t in (q4, k4, v4)]
            row["openvino ms"] = best(lambda: request.infer(arrays), args.reps) * 1e3  # noqa: B023
        row["latentforge GFLOP/s"] = gflop / row["latentforge ms"] * 1e3
        row["sdpa / latentforge"] = row["sdpa ms"] / row["latentforge ms"]
        if ov_ok:
            row["openvino / latentforge"] = row["openvino ms"] / row["latentforge ms"]
        rows.append(row)
        print(table([row], list(row)), flush=True)
    payload = {"machine": machine(), "threads": torch.get_num_threads(), "shapes": rows}
    if args.unet:
        payload["unet"] = unet_step(args.reps)
        payload["vae"] = vae_decode(args.reps)
    if args.psnr:
        payload["psnr"] = image_psnr(args.workdir, args.psnr)
    print(table(rows, list(rows[0])))
    print(save("attention", payload))


def unet_step(reps: int) -> dict:
    """One CFG step of a random SD1.5-shaped UNet (bf16, channels-last), with and without the kernels."""
    import torch

    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import UNet

    torch.manual_seed(0)
    unet = to_fast_layout(UNet(get_family("sd1").unet).to(torch.bfloat16).eval())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    ctx, t = torch.randn(2, 77, 768, generator=g).bfloat16(), torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        return on_off(lambda: unet(x, t, ctx), reps, "SD1.5 UNet CFG step")


def on_off(run, reps: int, label: str) -> dict:
    """``run()`` with the kernels on and off in alternation (the first round warms up): min seconds."""
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    outs = {}
    for _ in range(reps + 1):
        for mode in seconds:
            os.environ["LATENTFORGE_KERNELS"] = mode
            start = time.perf_counter()
            outs[mode] = run().float()
            seconds[mode].append(time.perf_counter() - start)
    result = {m: min(s[1:]) for m, s in seconds.items()}
    result["off / on"] = result["off"] / result["on"]
    result["max diff"] = float((outs["on"] - outs["off"]).abs().max())
    print(
        f"{label}: kernels {result['on']:.3f} s, PyTorch's ops {result['off']:.3f} s, "
        f"ratio {result['off / on']:.2f}x, max output difference {result['max diff']:.3g}"
    )
    return result


def vae_decode(reps: int) -> dict:
    """A 512x512 decode of a random SD VAE (bf16, channels-last), with and without the kernels."""
    import torch

    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL

    torch.manual_seed(0)
    fam = get_family("sd1")
    vae = to_fast_layout(AutoencoderKL(fam.vae, fam.latent_scale).to(torch.bfloat16).eval())
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        return on_off(lambda: vae.decode(z), reps, "SD VAE decode 512x512")


def image_psnr(workdir: Path, size: int, steps: int = 10) -> dict:
    """PSNR of a txt2img image of the random full-size SD1.5 model (bench_openvino's) on the default path
    (bf16, the kernels, packed convolutions) against the fp32 image of the same seed and against bf16
    with ``LATENTFORGE_KERNELS=off LATENTFORGE_PACK=0``. Each run in a fresh process."""
    from common import psnr, txt2img_images

    images = txt2img_images(
        workdir,
        size,
        steps,
        {
            "fp32": ("fp32", {}),
            "default": (None, {"LATENTFORGE_KERNELS": "auto"}),
            "off": (None, {"LATENTFORGE_KERNELS": "off", "LATENTFORGE_PACK": "0"}),
        },
    )
    result = {
        "size": size,
        "steps": steps,
        "default vs fp32 dB": psnr(images["default"], images["fp32"]),
        "kernels off vs fp32 dB": psnr(images["off"], images["fp32"]),
        "default vs kernels off dB": psnr(images["default"], images["off"]),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
