"""latentforge vs diffusers on a full-size SD1.5-shaped model (random weights; speed does not depend on them).

    python benchmarks/bench_sd15.py [--quick] [--workdir DIR] [--parts unet,vae,text,txt2img]

Each library runs in its own fresh process on the same files: one CFG UNet step at 512x512 (batch 2),
VAE decode at 512x512, text encoding of two prompts, and a whole 20-step 512x512 txt2img, in fp32 and
bf16, plus each library's default and best settings. Reports seconds, the ratio, achieved GFLOP/s
(FLOPs from torch's flop counter) against the machine's measured matmul peak, peak resident memory,
and the PSNR of latentforge's fast-path image against its fp32 image. Results: table on stdout and
benchmarks/results/sd15.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TIMER, random_sd15, run_child, save, table

PEAK = """
import torch, time, json
def peak(dtype):
    a = torch.randn(4096, 4096, dtype=dtype); b = torch.randn(4096, 4096, dtype=dtype)
    for _ in range(3): a @ b
    n, t = 10, time.perf_counter()
    for _ in range(n): a @ b
    return 2 * 4096**3 * n / (time.perf_counter() - t) / 1e9
def native_bf16():
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\\n")[0].split()
    except (OSError, IndexError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
# bf16 without native support is an emulated matmul many times slower (minutes here): not a peak worth timing
print(json.dumps({"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16) if native_bf16() else None}))
"""

OURS = (
    TIMER
    + """
import latentforge, numpy as np
from latentforge.sampling import Cond, ModelDenoiser, NoiseSchedule
cfg = json.loads('''{cfg}''')
base = rss_now()
pipe = latentforge.load(cfg["single"], dtype=cfg["dtype"])
res = {{}}
with torch.inference_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g); ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0]); z = torch.randn(1, 4, 64, 64, generator=g)
    parts = cfg["parts"]
    if "unet" in parts:
        f = lambda: pipe.unet(x, t, ctx)
        res["unet_s"], _ = timed(f, cfg["reps"]); res["unet_flops"] = flops(f)
    if "vae" in parts:
        f = lambda: pipe.vae.decode(z)
        res["vae_s"], _ = timed(f, max(1, cfg["reps"] // 2)); res["vae_flops"] = flops(f)
    if "text" in parts:
        f = lambda: pipe.encode_prompt(["a photograph of an astronaut riding a horse", ""], syntax="plain")
        res["text_s"], _ = timed(f, cfg["reps"] * 4); res["text_flops"] = flops(f)
    if "txt2img" in parts:
        run = lambda: pipe.txt2img("a photograph of an astronaut riding a horse", steps=20, seed=1, sampler="Euler",
                                   width=512, height=512, cfg_scale=7.5)
        t0 = time.perf_counter(); result = run(); res["txt2img_s"] = time.perf_counter() - t0
        np.save(cfg["image_out"], np.asarray(result.images[0]))
res["peak_rss"] = peak() - base
print(json.dumps(res))
"""
)

THEIRS = (
    TIMER
    + """
import diffusers, numpy as np
cfg = json.loads('''{cfg}''')
dtype = getattr(torch, cfg["torch_dtype"])
base = rss_now()
pipe = diffusers.StableDiffusionPipeline.from_pretrained(cfg["folder"], torch_dtype=dtype, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
if cfg["channels_last"]:
    pipe.unet.to(memory_format=torch.channels_last); pipe.vae.to(memory_format=torch.channels_last)
res = {{}}
with torch.inference_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).to(dtype); ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0]); z = torch.randn(1, 4, 64, 64, generator=g).to(dtype)
    if cfg["channels_last"]:
        x = x.to(memory_format=torch.channels_last); z = z.to(memory_format=torch.channels_last)
    parts = cfg["parts"]
    if "unet" in parts:
        f = lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample
        res["unet_s"], _ = timed(f, cfg["reps"]); res["unet_flops"] = flops(f)
    if "vae" in parts:
        f = lambda: pipe.vae.decode(z / 0.18215).sample
        res["vae_s"], _ = timed(f, max(1, cfg["reps"] // 2)); res["vae_flops"] = flops(f)
    if "text" in parts:
        f = lambda: pipe.encode_prompt(["a photograph of an astronaut riding a horse"], "cpu", 1, True, [""])
        res["text_s"], _ = timed(f, cfg["reps"] * 4); res["text_flops"] = flops(f)
    if "txt2img" in parts:
        t0 = time.perf_counter()
        image = pipe("a photograph of an astronaut riding a horse", num_inference_steps=20, guidance_scale=7.5,
                     height=512, width=512, generator=torch.Generator().manual_seed(1)).images[0]
        res["txt2img_s"] = time.perf_counter() - t0
res["peak_rss"] = peak() - base
print(json.dumps(res))
"""
)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--parts", default="unet,vae,text,txt2img")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repetition, no txt2img")
    args = ap.parse_args()
    parts = ["unet", "vae", "text"] if args.quick else args.parts.split(",")
    reps = 1 if args.quick else args.reps
    single, folder = random_sd15(args.workdir)
    peak = run_child(PEAK)
    bf16_peak = "not native" if peak["bf16"] is None else f"{peak['bf16']:.0f} GFLOP/s"
    print(f"measured matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {bf16_peak}", flush=True)

    runs = {
        # name: (library, config)
        "diffusers fp32 (default)": ("diffusers", dict(torch_dtype="float32", channels_last=False)),
        "diffusers bf16 + channels-last (best CPU)": ("diffusers", dict(torch_dtype="bfloat16", channels_last=True)),
        "latentforge fp32": ("ours", dict(dtype="fp32")),
        "latentforge default (auto fast path)": ("ours", dict(dtype=None)),
    }
    results = {}
    for name, (lib, conf) in runs.items():
        conf = dict(
            conf,
            parts=parts,
            reps=reps,
            single=str(single),
            folder=str(folder),
            image_out=str(args.workdir / f"{name.split()[0]}-{len(results)}.npy"),
        )
        code = (OURS if lib == "ours" else THEIRS).format(cfg=json.dumps(conf))
        print(f"running {name} ...", flush=True)
        results[name] = run_child(code, timeout=7200)
        results[name]["image"] = conf["image_out"]

    rows = []
    ref = results["diffusers fp32 (default)"]
    best = results["diffusers bf16 + channels-last (best CPU)"]
    for name, r in results.items():
        row = {"run": name, "peak_rss_GB": r["peak_rss"] / 1e9}
        for part in ("unet", "vae", "text", "txt2img"):
            if f"{part}_s" in r:
                row[f"{part}_s"] = r[f"{part}_s"]
                row[f"{part}_vs_diffusers_default"] = ref[f"{part}_s"] / r[f"{part}_s"]
                row[f"{part}_vs_diffusers_best"] = best[f"{part}_s"] / r[f"{part}_s"]
                if f"{part}_flops" in r:
                    gflops = r[f"{part}_flops"] / r[f"{part}_s"] / 1e9
                    row[f"{part}_GFLOPs"] = gflops
                    bf16 = ("fp32" not in name and "default)" not in name) or "auto" in name
                    row[f"{part}_of_peak"] = gflops / (peak["bf16"] if bf16 else peak["fp32"])
        rows.append(row)
    if "txt2img" in parts:
        fast = np.load(results["latentforge default (auto fast path)"]["image"])
        exact = np.load(results["latentforge fp32"]["image"])
        rows[-1]["psnr_vs_fp32_dB"] = psnr(fast, exact)
    cols = [
        "run",
        "unet_s",
        "unet_vs_diffusers_default",
        "unet_vs_diffusers_best",
        "unet_GFLOPs",
        "unet_of_peak",
        "vae_s",
        "vae_vs_diffusers_default",
        "text_s",
        "txt2img_s",
        "txt2img_vs_diffusers_default",
        "txt2img_vs_diffusers_best",
        "psnr_vs_fp32_dB",
        "peak_rss_GB",
    ]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(f"saved {save('sd15', {'peak_gflops': peak, 'rows': rows, 'raw': results})}")


if __name__ == "__main__":
    main()
