"""latentforge against OpenVINO (the CPU anchor of issue 16) and diffusers, interleaved in one run.

    python benchmarks/bench_openvino.py [--tiny] [--rounds 3] [--reps 3] [--libs latentforge,openvino,diffusers]

Needs the benchmark extra: ``pip install -e '.[bench]'`` (OpenVINO). All libraries read the same
random-weight SD1.5-shaped diffusers folder (``bench_sd15.py``'s files; ``--tiny``: the tests' tiny
SD1 model at 64 px, a one-minute check of this script). OpenVINO gets the diffusers UNet, VAE decoder
and CLIP text model converted once with ``openvino.convert_model`` (static shapes, IR cached in the
work folder) and compiled for the CPU with ``INFERENCE_PRECISION_HINT`` bf16 where the CPU has native
bf16 (f32 otherwise). Each library runs in fresh processes, in rotating order, ``--rounds`` times;
each process times ``--reps`` runs of each part after a warm-up: UNet CFG step (batch 2), VAE decode,
text encoding of a prompt and the empty prompt (OpenVINO: the encoder on token ids), and one whole
20-step image (OpenVINO: the sum of its components, text + 20 UNet steps + decode). Reports min and
median seconds, peak RSS above the process's baseline, GFLOP/s against the measured matmul peak of the
precision in use (bf16, else fp32), and the ratios to issue 16's targets.
Results: stdout and benchmarks/results/openvino[-tiny].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TIMER, machine, random_sd15, run_child, save, table

PROMPT = "a photograph of an astronaut riding a horse"
PARTS = ("unet", "vae", "text", "image")
# issue 16's targets: latentforge's time (or memory) over OpenVINO's at most this
TARGETS = {"unet": 0.9, "vae": 1.0, "image": 0.85, "peak_rss": 0.6}
TARGET_OF_PEAK = 0.70

# every child: cfg (folder, size, ctx_dim, reps, steps, parts) is prepended as JSON
INPUTS = """
g = torch.Generator().manual_seed(0)
H = cfg["size"] // 8
x = torch.randn(2, 4, H, H, generator=g); ctx = torch.randn(2, 77, cfg["ctx_dim"], generator=g)
t = torch.tensor([500.0, 500.0]); z = torch.randn(1, 4, H, H, generator=g)
res = {}
"""

OURS = (
    """
import latentforge
base = rss_now()
pipe = latentforge.load(cfg["folder"], dtype=cfg.get("dtype"))
"""
    + INPUTS
    + """
with torch.inference_mode():
    if "unet" in cfg["parts"]:
        f = lambda: pipe.unet(x, t, ctx)
        from latentforge import allocator
        from latentforge.nn.packed import packed_session
        # as a generation runs the UNet (pipelines/generate.py): packed, and after the first call (which
        # packs) freed blocks reused between steps
        with packed_session(pipe.unet, repeated=True):
            f()
            with allocator.reusing("steps"):
                res["unet"] = times(f, cfg["reps"])
        res["unet_flops"] = flops(f)
    if "vae" in cfg["parts"]:
        res["vae"] = times(lambda: pipe.vae.decode(z), cfg["reps"])
    if "text" in cfg["parts"]:
        res["text"] = times(lambda: pipe.encode_prompt([cfg["prompt"], ""], syntax="plain"), cfg["reps"])
if "image" in cfg["parts"]:
    run = lambda: pipe.txt2img(cfg["prompt"], steps=cfg["steps"], seed=1, sampler="Euler", width=cfg["size"],
                               height=cfg["size"], cfg_scale=7.5)
    res["image"] = times(run, 1)
res["peak_rss"] = peak() - base
print(json.dumps(res))
"""
)

DIFFUSERS = (
    """
import diffusers
base = rss_now()
dt = torch.bfloat16 if cfg["bf16"] else torch.float32
pipe = diffusers.StableDiffusionPipeline.from_pretrained(cfg["folder"], torch_dtype=dt, safety_checker=None,
                                                         requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
cl = torch.channels_last
pipe.unet.to(memory_format=cl); pipe.vae.to(memory_format=cl)
"""
    + INPUTS
    + """
x, ctx, z = x.to(dt).to(memory_format=cl), ctx.to(dt), z.to(dt).to(memory_format=cl)
with torch.inference_mode():
    if "unet" in cfg["parts"]:
        res["unet"] = times(lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample, cfg["reps"])
    if "vae" in cfg["parts"]:
        res["vae"] = times(lambda: pipe.vae.decode(z).sample, cfg["reps"])
    if "text" in cfg["parts"]:
        res["text"] = times(lambda: pipe.encode_prompt([cfg["prompt"]], "cpu", 1, True, [""]), cfg["reps"])
    if "image" in cfg["parts"]:
        run = lambda: pipe(cfg["prompt"], num_inference_steps=cfg["steps"], guidance_scale=7.5, height=cfg["size"],
                           width=cfg["size"], generator=torch.Generator().manual_seed(1))
        res["image"] = times(run, 1)
res["peak_rss"] = peak() - base
print(json.dumps(res))
"""
)

# one component per process (bounded memory): the diffusers module traced and saved as OpenVINO IR
CONVERT = (
    """
import openvino as ov
from pathlib import Path
folder, part, out = Path(cfg["folder"]), cfg["part"], cfg["out"]
"""
    + INPUTS
    + """
with torch.no_grad():
    if part == "unet":
        import diffusers
        m = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        class Wrap(torch.nn.Module):
            def __init__(self, m): super().__init__(); self.m = m
            def forward(self, x, t, ctx): return self.m(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        example = (x, t, ctx)
    elif part == "vae":
        import diffusers
        m = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
        class Wrap(torch.nn.Module):
            def __init__(self, m): super().__init__(); self.m = m
            def forward(self, z): return self.m.decode(z, return_dict=False)[0]
        example = (z,)
    else:
        import transformers
        m = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        class Wrap(torch.nn.Module):
            def __init__(self, m): super().__init__(); self.m = m
            def forward(self, ids): return self.m(ids, return_dict=False)[0]
        example = (torch.randint(0, 49408, (2, 77)),)
    model = ov.convert_model(Wrap(m), example_input=example, input=[tuple(e.shape) for e in example])
    ov.save_model(model, out, compress_to_fp16=False)
print(json.dumps({"ok": True}))
"""
)

OPENVINO = (
    """
import numpy as np, openvino as ov
core = ov.Core()
base = rss_now()
hint = {"INFERENCE_PRECISION_HINT": "bf16" if cfg["bf16"] else "f32", "PERFORMANCE_HINT": "LATENCY"}
nets = {p: core.compile_model(cfg["ir"][p], "CPU", hint).create_infer_request() for p in ("unet", "vae", "text")}
"""
    + INPUTS
    + """
ids = np.random.default_rng(0).integers(0, 49408, (2, 77)).astype(np.int64)
feeds = {"unet": [x.numpy(), t.numpy(), ctx.numpy()], "vae": [z.numpy()], "text": [ids]}
for p in ("unet", "vae", "text"):
    if p in cfg["parts"] or "image" in cfg["parts"]:
        res[p] = times(lambda: nets[p].infer(feeds[p]), cfg["reps"])
res["precision"] = hint["INFERENCE_PRECISION_HINT"]
res["peak_rss"] = peak() - base
print(json.dumps(res))
"""
)


def child(body: str, cfg: dict) -> str:
    return TIMER + f"cfg = json.loads({json.dumps(cfg)!r})\n" + body


def prepare(workdir: Path, tiny: bool) -> tuple[Path, int, int]:
    """(diffusers folder, image size, text width): the random model all libraries read."""
    workdir.mkdir(parents=True, exist_ok=True)
    if tiny:
        folder = workdir / "tiny-sd1-diffusers"
        if not folder.exists():
            tests = Path(__file__).resolve().parents[1] / "tests"
            code = (
                f"import sys, json; sys.path.insert(0, {str(tests)!r}); from pathlib import Path\n"
                "from tiny import build_reference, save_folder\n"
                f"save_folder(build_reference('sd1'), Path({str(folder)!r})); print(json.dumps({{}}))"
            )
            run_child(code)
        return folder, 64, 128
    return random_sd15(workdir)[1], 512, 768


def convert_for_openvino(folder: Path, size: int, ctx_dim: int) -> dict[str, str]:
    """IR files of the UNet, VAE decoder and text model for ``size`` (converted once, then reused)."""
    out = folder.parent / f"{folder.name}-openvino-{size}"
    out.mkdir(exist_ok=True)
    paths = {}
    for part in ("unet", "vae", "text"):
        paths[part] = str(out / f"{part}.xml")
        if not Path(paths[part]).exists():
            print(f"converting the {part} to OpenVINO IR ...", flush=True)
            cfg = dict(folder=str(folder), part=part, out=paths[part], size=size, ctx_dim=ctx_dim)
            run_child(child(CONVERT, cfg), timeout=7200)
    return paths


def library_code(lib: str, cfg: dict) -> str:
    return child({"latentforge": OURS, "diffusers": DIFFUSERS, "openvino": OPENVINO}[lib], cfg)


# what each library's users get by default: latentforge sets PASSIVE itself (its children import torch
# first, so the variable is given here), the others leave OpenMP's default
LIB_ENV = {"latentforge": {"OMP_WAIT_POLICY": "PASSIVE"}, "diffusers": {"OMP_WAIT_POLICY": None}, "openvino": {}}


def summarize(runs: list[dict], steps: int) -> dict:
    """min/median per part over all repetitions of all rounds; OpenVINO's image = sum of components."""
    out: dict = {}
    for part in PARTS:
        samples = [s for r in runs for s in r.get(part, [])]
        if samples:
            out[f"{part}_min"], out[f"{part}_med"] = min(samples), statistics.median(samples)
    if "image_med" not in out and all(f"{p}_med" in out for p in ("unet", "vae", "text")):
        for k in ("min", "med"):
            out[f"image_{k}"] = out[f"text_{k}"] + steps * out[f"unet_{k}"] + out[f"vae_{k}"]
        out["image_is_sum"] = True
    out["peak_rss"] = max(r["peak_rss"] for r in runs)
    flops = [r["unet_flops"] for r in runs if "unet_flops" in r]
    if flops:
        out["unet_flops"] = flops[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny SD1 model at 64 px: checks the script")
    ap.add_argument("--libs", default="latentforge,openvino,diffusers")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per library, interleaved")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each part per process")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from bench_sd15 import PEAK

    folder, size, ctx_dim = prepare(args.workdir, args.tiny)
    libs = args.libs.split(",")
    bf16 = bool(machine().get("cpu_bf16"))
    base = dict(folder=str(folder), size=size, ctx_dim=ctx_dim, reps=args.reps, steps=args.steps, prompt=PROMPT)
    base.update(parts=args.parts.split(","), bf16=bf16)
    if "openvino" in libs:
        base["ir"] = convert_for_openvino(folder, size, ctx_dim)
    peak = run_child(PEAK)
    # the share of the peak of the precision the libraries run in (bf16 where the CPU has it, else fp32)
    precision = "bf16" if bf16 else "fp32"
    bf16_peak = "not native" if peak["bf16"] is None else f"{peak['bf16']:.0f} GFLOP/s"
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {bf16_peak}; running in {precision}")
    raw: dict[str, list[dict]] = {lib: [] for lib in libs}
    for r in range(args.rounds):
        for lib in libs[r % len(libs) :] + libs[: r % len(libs)]:  # rotating order
            print(f"round {r + 1}/{args.rounds}: {lib} ...", flush=True)
            raw[lib].append(run_child(library_code(lib, base), timeout=7200, env=LIB_ENV[lib]))
    results = {lib: summarize(runs, args.steps) for lib, runs in raw.items()}
    flops = next((v["unet_flops"] for v in results.values() if "unet_flops" in v), None)
    rows = []
    for lib, s in results.items():
        row = {"library": lib, **{k: v for k, v in s.items() if k.endswith(("_min", "_med"))}}
        row["peak_rss_GB"] = s["peak_rss"] / 1e9
        if flops and "unet_med" in s:
            row["unet_GFLOPs"] = flops / s["unet_med"] / 1e9
            row["unet_of_peak"] = row["unet_GFLOPs"] / peak[precision]
        rows.append(row)
    cols = [c for c in ("library", *(f"{p}_{k}" for p in PARTS for k in ("min", "med"))) if any(c in r for r in rows)]
    print(table(rows, [*cols, "peak_rss_GB", "unet_GFLOPs", "unet_of_peak"]))
    verdict = targets(results)
    ours = next((r for r in rows if r["library"] == "latentforge" and "unet_of_peak" in r), None)
    if ours is not None:
        share = ours["unet_of_peak"]
        verdict["unet_of_peak"] = share
        mark = "met" if share >= TARGET_OF_PEAK else "NOT met"
        verdict["lines"].append(
            f"target UNet step at >= {TARGET_OF_PEAK:.0%} of the {precision} matmul peak: {share:.0%}: {mark}"
        )
    for line in verdict["lines"]:
        print(line)
    name = "openvino-tiny" if args.tiny else "openvino"
    print(f"saved {save(name, {'peak_gflops': peak, 'rows': rows, 'targets': verdict, 'raw': raw})}")


def targets(results: dict) -> dict:
    """latentforge / OpenVINO for each of issue 16's CPU targets (medians), and the share of the peak."""
    ours, ov = results.get("latentforge"), results.get("openvino")
    out: dict = {"lines": []}
    if ours is None or ov is None:
        return out
    for part, limit in TARGETS.items():
        key = "peak_rss" if part == "peak_rss" else f"{part}_med"
        if key in ours and key in ov:
            ratio = ours[key] / ov[key]
            out[part] = ratio
            what = "sum of OpenVINO's components" if part == "image" else "OpenVINO"
            mark = "met" if ratio <= limit else "NOT met"
            out["lines"].append(f"target {part}: latentforge {ratio:.2f}x {what} (target <= {limit}x): {mark}")
    return out


if __name__ == "__main__":
    main()
