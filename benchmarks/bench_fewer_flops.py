"""Fewer FLOPs, as options that change images: seconds and quality of each against the default path.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_fewer_flops.py [--seeds 6] [--steps 20] [--no-full]

1. Quality and seconds on the bundled demo model (64 px, v-prediction, DPM++ 2M Karras, CFG 7): for each
   option, seconds per image (median over the seeds) and PSNR of the image against the default path's
   image of the same seed (mean over the seeds; identical images count as 99 dB), and how many images still
   show what the prompt asks (tests/test_demo.py's colour/shape analysis). The demo's first level has no
   attention, so ToMe runs there with max_downsample 2 (at A1111's 1 it changes nothing, as for SDXL).
2. Time only, on a full-size SD1.5-shaped UNet with random weights at a 512 px latent (64 x 64, batch 2 =
   one CFG step; the automatic dtype: bf16 on CPUs with native bf16): the fastest of ``--reps`` rounds (the
   options interleaved in each round) and the counted GFLOP (matmuls and convolutions; torch's counter
   does not see the CPU flash-attention kernel, which is where ToMe saves) of one
   call for ToMe 0.3/0.5 (A1111's settings), a DeepCache retrieve call (depth 0) and the per-step mean for
   intervals 2/3/5, and NGMS's cond-only call. Random weights make its images meaningless, so no quality.

Timings on a shared machine are distorted by other processes; FLOP counts are not. Results are saved in
benchmarks/results/fewer_flops.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from common import TIMER, run_child, save, table

CASES = [("red", "circle", "blue"), ("green", "triangle", "white"), ("yellow", "square", "red")]
OPTIONS = [
    ("default", {}),
    ("NGMS 0.5", {"s_min_uncond": 0.5}),
    ("NGMS 2", {"s_min_uncond": 2.0}),
    ("NGMS 2 all steps", {"s_min_uncond": 2.0, "s_min_uncond_all": True}),
    ("NGMS 5", {"s_min_uncond": 5.0}),
    ("DeepCache 2", {"deepcache_interval": 2}),
    ("DeepCache 3", {"deepcache_interval": 3}),
    ("DeepCache 5", {"deepcache_interval": 5}),
    ("DeepCache 5 non-uniform", {"deepcache_interval": 5, "deepcache_schedule": "non-uniform"}),
    ("DeepCache 3 depth 3", {"deepcache_interval": 3, "deepcache_depth": 3}),
    ("ToMe 0.3 (md 2)", {"token_merging_ratio": 0.3, "token_merging_max_downsample": 2}),
    ("ToMe 0.5 (md 2)", {"token_merging_ratio": 0.5, "token_merging_max_downsample": 2}),
    # the few-step presets set their own sampler, steps, CFG and schedule; the demo model is not distilled for
    # few steps (no LCM-LoRA or Turbo weights exist here), so these rows show the cost of using them without one
    ("preset lcm (not distilled)", {"preset": "lcm"}),
    ("preset turbo (not distilled)", {"preset": "turbo"}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def demo_rows(seeds: int, steps: int) -> list[dict]:
    import latentforge
    from latentforge.demo import bundled_model_path
    from test_demo import analyse

    pipe = latentforge.load(bundled_model_path())
    jobs = [(f"a {c} {s} on a {b} background", (c, s, b), 100 + i) for i in range(seeds) for c, s, b in [CASES[i % 3]]]
    pipe.txt2img(jobs[0][0], seed=1, steps=steps)  # warm-up
    reference: dict[int, np.ndarray] = {}
    rows = []
    for name, options in OPTIONS:
        seconds, quality, correct = [], [], 0
        for prompt, want, seed in jobs:
            start = time.perf_counter()
            given = options if "preset" in options else {"steps": steps, **options}
            image = pipe.txt2img(prompt, seed=seed, **given).images[0]
            seconds.append(time.perf_counter() - start)
            pixels = np.asarray(image)
            reference.setdefault(seed, pixels)
            quality.append(psnr(reference[seed], pixels))
            correct += analyse(image) == want
        rows.append(
            {
                "option": name,
                "s_per_image": statistics.median(seconds),
                "psnr_dB": statistics.mean(quality),
                "min_psnr_dB": min(quality),
                "prompt_ok": f"{correct}/{len(jobs)}",
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    base = rows[0]["s_per_image"]
    for row in rows:
        row["speedup"] = base / row["s_per_image"]
    return rows


FULL = (
    TIMER
    + """
import json
from latentforge.adapters.patcher import ModelPatcher
from latentforge.device import auto_dtype, to_fast_layout
from latentforge.models.unet import FeatureCache, UNet, UNetConfig
from latentforge.pipelines.fewer_flops import FewerFlops, PassFlops
reps, width, side = {reps}, {width}, {side}
torch.manual_seed(0)
cfg = UNetConfig(model_channels=width)  # SD1.5's shape at width 320
unet = UNet(cfg)
dtype, _ = auto_dtype(torch.device("cpu"), sum(p.numel() for p in unet.parameters()))
unet = to_fast_layout(unet.to(dtype).eval())
x = torch.randn(2, 4, side, side).to(dtype); ctx = torch.randn(2, 77, 768).to(dtype); t = torch.tensor([500.0] * 2)
cache = FeatureCache(0)
patcher = ModelPatcher(lambda: {{"unet": unet}})
ff = FewerFlops()
patcher.add_hook("bench", unet, pre=ff.pre_forward, with_kwargs=True)
patcher.add_token_merge("bench", ff.token_merge)
def tome(ratio):
    def call():
        ff.current = PassFlops(torch.zeros(2), ratio=ratio)
        try:
            return unet(x, t, ctx)
        finally:
            ff.current = None
    return call
calls = {{
    "default": lambda: unet(x, t, ctx),
    "cond only (NGMS skip)": lambda: unet(x[:1], t[:1], ctx[:1]),
    "DeepCache retrieve (depth 0)": lambda: unet(x, t, ctx, cache=cache),
    "ToMe 0.3": tome(0.3),
    "ToMe 0.5": tome(0.5),
}}
out = {{"dtype": str(dtype)}}
best = {{name: float("inf") for name in calls}}
with torch.inference_mode():
    unet(x, t, ctx, cache=cache)  # keeps the deep features; also the warm-up
    for name, f in calls.items():
        f()
    for _ in range(reps):  # interleaved, so that a burst of other load hits every option alike; the minimum
        for name, f in calls.items():
            start = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, f in calls.items():
        out[name] = {{"s": best[name], "gflop": flops(f) / 1e9}}
patcher.remove("bench")
print(json.dumps(out))
"""
)


def full_rows(reps: int, width: int = 320, side: int = 64) -> tuple[list[dict], str]:
    r = run_child(FULL.format(reps=reps, width=width, side=side), timeout=7200)
    dtype = r.pop("dtype")
    r.pop("wall_s", None)
    base = r["default"]
    rows = [{"call": k, "s": v["s"], "GFLOP": v["gflop"], "speedup": base["s"] / v["s"]} for k, v in r.items()]
    retrieve = r["DeepCache retrieve (depth 0)"]
    for n in (2, 3, 5):  # per step: one whole UNet every n steps, retrieve calls between
        s = (base["s"] + (n - 1) * retrieve["s"]) / n
        g = (base["gflop"] + (n - 1) * retrieve["gflop"]) / n
        rows.append({"call": f"DeepCache {n} (mean per step)", "s": s, "GFLOP": g, "speedup": base["s"] / s})
    return rows, dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="rounds of timed calls of the full-size UNet (minimum)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-size UNet (3.4 GB in fp32)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo model's quality and seconds")
    args = ap.parse_args()
    payload: dict = {"steps": args.steps, "seeds": args.seeds}
    if not args.no_demo:
        demo = demo_rows(args.seeds, args.steps)
        print(f"\ndemo model, 64 px, {args.steps} steps, {args.seeds} seeds (PSNR against the default image)")
        print(table(demo, ["option", "s_per_image", "speedup", "psnr_dB", "min_psnr_dB", "prompt_ok"]))
        payload["demo"] = demo
    if not args.no_full:
        full, dtype = full_rows(args.reps)
        print(f"\nSD1.5-shaped UNet, random weights, 512 px latent, batch 2, {dtype} (time only)")
        print(table(full, ["call", "s", "speedup", "GFLOP"]))
        payload.update(full_size=full, full_size_dtype=dtype)
    print(f"saved {save('fewer_flops', payload)}")
    print(json.dumps({"note": "timings on a shared machine are distorted by other load; FLOP counts are not"}))


if __name__ == "__main__":
    main()
