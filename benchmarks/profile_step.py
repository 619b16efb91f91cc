"""Where the time of one sampling step goes, on one device: latentforge's UNet alone against its whole
Euler step, with and without the per-step NaN/Inf check, and torch.profiler's table of the host calls
of a few steps (synchronizations, host-to-device copies, kernel launches). A diagnostic for issue 16,
prepared to run in one device call:

    PYTHONPATH=src python benchmarks/profile_step.py --device cuda            # SD1.5-shaped, 512 px, fp16
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --device cpu --tiny  # a check of the script
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"


def build(family: str, device: str, tiny: bool, folder: Path):
    import latentforge
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet
    from latentforge.pipeline import Pipeline

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_reference, save_folder

        with tempfile.TemporaryDirectory() as tmp:
            latentforge.load(save_folder(build_reference(family), Path(tmp) / "m")).save(folder, layout="diffusers")
    else:
        torch.manual_seed(0)
        fam = get_family(family)
        with torch.device(device):
            unet, vae = UNet(fam.unet), AutoencoderKL(fam.vae, fam.latent_scale)
            encoders = tuple(CLIPTextModel(spec.config) for spec in fam.text)
        tokenizers = tuple(CLIPTokenizer(pad_id=spec.pad_id) for spec in fam.text)
        Pipeline(fam, "eps", unet, vae, encoders, tokenizers).save(folder, layout="diffusers", dtype="fp16")
    return latentforge.load(folder, device=device)


def _upcast_group_norm(x, w, b):
    import torch.nn.functional as F

    return F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5).to(x.dtype)


def group_norm_check(dev: torch.device, sync) -> None:
    """fp16 GroupNorm (32 groups) on channels-last activations: upcast to fp32 as the original UNet does,
    against PyTorch's fp16 kernel (fp32 statistics inside) on the same tensor and on a contiguous one."""
    import torch.nn.functional as F

    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    for shape in [(2, 320, 128, 128), (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 3 + 1).to(dev, dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(shape[1], generator=g) * 0.2 + 1).to(dev, dtype)
        b = (torch.randn(shape[1], generator=g) * 0.2).to(dev, dtype)
        xc = x.contiguous()
        up = functools.partial(_upcast_group_norm, x, w, b)
        native = functools.partial(F.group_norm, x, 32, w, b, 1e-5)
        plain = functools.partial(F.group_norm, xc, 32, w, b, 1e-5)
        diff = (up().float() - native().float()).abs()
        rel = diff / up().float().abs().clamp(min=1e-3)
        out = {}
        for name, fn in (("upcast", up), ("native", native), ("native_contiguous", plain)):
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            sync()
            out[name] = (time.perf_counter() - t) / 20 * 1e6
        print(
            f"group norm {shape} {dtype}: upcast {out['upcast']:.0f} us, native {out['native']:.0f} us, native "
            f"on contiguous {out['native_contiguous']:.0f} us; max |diff| {diff.max().item():.3g}, max rel "
            f"{rel.max().item():.3g}, differing values {(diff > 0).float().mean().item():.2%}; native output "
            f"channels-last: {native().is_contiguous(memory_format=torch.channels_last)}"
        )


def layout_check(pipe, dev: torch.device, size: int, sync) -> None:
    """The UNet step (batch 2) and the VAE decode with channels-last weights (as loaded) against the
    default contiguous layout, and whether the outputs are identical."""

    def median_ms(fn, reps=10):
        fn()
        sync()
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(dev)
    ts = torch.tensor([500.0, 500.0], device=dev)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(dev, pipe.unet.dtype)
    y = torch.randn(2, cfg.adm_in_channels, generator=g).to(dev, pipe.unet.dtype) if cfg.adm_in_channels else None
    z = torch.randn(1, 4, lat, lat, generator=g).to(dev, pipe.vae.dtype)
    results = {}
    for layout in (torch.channels_last, torch.contiguous_format):
        pipe.unet.to(memory_format=layout)
        pipe.vae.to(memory_format=layout)
        with torch.inference_mode():
            u = median_ms(lambda: pipe.unet(x, ts, ctx, y))
            v = median_ms(lambda: pipe.vae.decode(z), reps=5)
            results[layout] = (u, v, pipe.unet(x, ts, ctx, y).float(), pipe.vae.decode(z).float())
        print(f"layout {layout}: unet step {u:.2f} ms, vae decode {v:.2f} ms")
    a, b = results[torch.channels_last], results[torch.contiguous_format]
    print(
        f"layout: unet max |diff| {(a[2] - b[2]).abs().max().item():.3g}, vae max |diff| "
        f"{(a[3] - b[3]).abs().max().item():.3g}"
    )
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--group-norm", action="store_true", help="only the GroupNorm timing and accuracy check")
    ap.add_argument("--layout", action="store_true", help="only the channels-last against contiguous check")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    size = args.size or (64 if args.tiny else 1024 if args.family.startswith("sdxl") else 512)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.group_norm:
        group_norm_check(dev, sync)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pipe = build(args.family, args.device, args.tiny, Path(tmp) / "m")
        print(f"model ready in {time.perf_counter() - t:.1f} s: unet {pipe.unet.dtype}, vae {pipe.vae.dtype}")
    if args.layout:
        layout_check(pipe, dev, size, sync)
        return
    stamps: list[float] = []

    def stamp(p, with_sync=True):
        if with_sync:
            sync()
        stamps.append(time.perf_counter())

    def image(steps, progress=None):
        return pipe.txt2img(
            PROMPT, steps=steps, seed=1, sampler="Euler", width=size, height=size, cfg_scale=7.0, progress=progress
        )

    def per_step(with_sync: bool) -> float:
        runs = []
        for _ in range(3):
            stamps.clear()
            image(args.steps, lambda p: stamp(p, with_sync))
            sync()
            runs.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        return statistics.median(runs)

    import latentforge.pipelines.numerics as numerics

    with torch.inference_mode():
        image(3)
        sync()
        lat = size // 8
        g = torch.Generator().manual_seed(0)
        ucfg = pipe.unet.config
        x = torch.randn(2, 4, lat, lat, generator=g).to(dev)
        ts = torch.tensor([500.0, 500.0], device=dev)
        ctx = torch.randn(2, 77, ucfg.context_dim, generator=g).to(dev, pipe.unet.dtype)
        y = None
        if ucfg.adm_in_channels:
            y = torch.randn(2, ucfg.adm_in_channels, generator=g).to(dev, pipe.unet.dtype)
        times = []
        for _ in range(12):
            sync()
            t = time.perf_counter()
            pipe.unet(x, ts, ctx, y)
            sync()
            times.append(time.perf_counter() - t)
        unet_s = statistics.median(times[2:])
        t = time.perf_counter()
        for _ in range(10):
            pipe.unet(x, ts, ctx, y)
        sync()
        unet_queued_s = (time.perf_counter() - t) / 10
        step_sync = per_step(True)
        step_nosync = per_step(False)
        original = numerics.is_finite
        numerics.is_finite = lambda t: True
        try:
            step_nocheck = per_step(False)
        finally:
            numerics.is_finite = original
        print(
            f"unet alone, synchronized each call: {unet_s * 1e3:.2f} ms; queued back to back: "
            f"{unet_queued_s * 1e3:.2f} ms"
        )
        print(
            f"Euler step, synchronized each step: {step_sync * 1e3:.2f} ms; not synchronized: "
            f"{step_nosync * 1e3:.2f} ms; without the NaN/Inf check: {step_nocheck * 1e3:.2f} ms"
        )
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            image(4)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        names = (
            "cudaStreamSynchronize",
            "cudaDeviceSynchronize",
            "cudaMemcpyAsync",
            "cudaLaunchKernel",
            "aten::_local_scalar_dense",
            "aten::copy_",
            "aten::item",
        )
        for e in prof.key_averages():
            if e.key in names:
                print(f"{e.key}: {e.count} calls, {e.self_cpu_time_total / 1e3:.1f} ms host")


if __name__ == "__main__":
    main()
