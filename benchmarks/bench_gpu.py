"""The GPU path of issue 16: latentforge against diffusers on one CUDA GPU, prepared to run in one call.

On the development machine (no GPU), once per session that is lent one, the wheels the device machine's image
lacks (diffusers, the server's and latentforge's pure-Python needs) into ``.whl/`` (ignored by git):

    bash benchmarks/gpu_wheels.sh

then, through the ``device`` tool (``carry: [".whl"]``), as one command:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    PYTHONUNBUFFERED=1 PYTHONPATH=src:/tmp/site python3 benchmarks/bench_gpu.py --out $OUT --budget 500

and anywhere, a check of this script with the tests' tiny models on the CPU (one minute):

    python benchmarks/bench_gpu.py --tiny --device cpu

Parts (``--parts``, in this order; each library runs in its own fresh process; a part that fails is
reported and the others go on; parts not started before ``--budget`` seconds are skipped):

- ``sd15``: an SD1.5-shaped model with random weights (speed does not depend on them), written once by
  latentforge as an fp16 diffusers folder that both libraries load: a 512x512 image, 50 steps Euler, CFG
  7 (whole-image seconds and sampling it/s from per-step CUDA events, which do not stall the GPU), one
  UNet CFG step (batch 2) and one VAE decode alone (CUDA-synchronized, median of ``--reps``), peak GPU
  memory. latentforge runs as ``load(folder, device="cuda")`` gives it (fp16, SDPA, channels-last);
  diffusers fp16 with its default SDPA attention processor and channels-last UNet (its documented speed
  settings). Quality: the UNet outputs of both libraries on the same inputs (relative RMS difference: the
  same weights), and latentforge's fp16 image against its fp32 image of the same seed (PSNR).
- ``sdxl``: the same for an SDXL-base-shaped model at 1024x1024, 30 steps; also which dtype the VAE ran in
  (the SDXL VAE overflows in fp16, so latentforge runs it in bf16 or fp32: ``device.vae_dtype``).
- ``compile``: ``sd15`` again with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs for the fixed
  shapes) for both libraries: the first image (compiling) and it/s after it.
- ``server``: ``bench_server_batch.py`` on the ``sd15`` folder, ``--device cuda``, 512x512, 20 steps:
  queued jobs batched (``--max-batch`` 1 against 8) with 8 concurrent clients, images/s.

Results: a table per part on stdout, and ``gpu.json`` in ``--out`` (rewritten after every part) and
benchmarks/results/gpu[-tiny].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import psnr, run_child, save, table

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"

# A random-weight model of `family`, written by latentforge as a diffusers folder (built on the device:
# seconds on a GPU for SDXL's 3.5 billion parameters, where the CPU takes minutes).
WRITE = """
import json, torch
from latentforge.families import get_family
from latentforge.models import UNet, AutoencoderKL, CLIPTextModel, CLIPTokenizer
from latentforge.pipeline import Pipeline
cfg = json.loads('''{cfg}''')
torch.manual_seed(0)
fam = get_family(cfg["family"])
with torch.device(cfg["device"]):
    unet, vae = UNet(fam.unet), AutoencoderKL(fam.vae, fam.latent_scale)
    encoders = tuple(CLIPTextModel(spec.config) for spec in fam.text)
tokenizers = tuple(CLIPTokenizer(pad_id=spec.pad_id) for spec in fam.text)
Pipeline(fam, "eps", unet, vae, encoders, tokenizers).save(cfg["folder"], layout="diffusers", dtype=cfg["dtype"])
print(json.dumps({{}}))
"""

# The tests' tiny models of the same families (tests/tiny.py), for --tiny, written again by latentforge as
# the full-size run writes its models (so diffusers reads latentforge's folders here too).
WRITE_TINY = """
import json, sys, tempfile
sys.path.insert(0, {tests!r})
from pathlib import Path
import latentforge
from tiny import build_reference, save_folder
cfg = json.loads('''{cfg}''')
with tempfile.TemporaryDirectory() as tmp:
    pipe = latentforge.load(save_folder(build_reference(cfg["family"]), Path(tmp) / "m"))
    pipe.save(cfg["folder"], layout="diffusers", dtype=cfg["dtype"])
print(json.dumps({{}}))
"""

# Shared by both libraries' children: timing with the device synchronized, the UNet's inputs.
COMMON = """
import json, time, statistics, numpy as np, torch
cfg = json.loads('''{cfg}''')
dev = torch.device(cfg["device"])
cuda = dev.type == "cuda"
def sync():
    if cuda:
        torch.cuda.synchronize()
def median_s(fn, reps):
    fn(); sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); out.append(time.perf_counter() - t)
    return statistics.median(out)
# per-step marks: CUDA events on a GPU (a synchronization in every step would stall the GPU between steps,
# measuring the host's wait rather than the library), the clock on the CPU
stamps = []
def stamp():
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        stamps.append(event)
    else:
        stamps.append(time.perf_counter())
def span_s(a, b):
    return a.elapsed_time(b) / 1e3 if cuda else b - a
def image_run(call):
    stamps.clear(); sync(); t = time.perf_counter()
    img = call(); sync()
    total = time.perf_counter() - t
    its = (len(stamps) - 1) / span_s(stamps[0], stamps[-1]) if len(stamps) > 1 else None
    return total, its, img
def images(call):  # the first image (warm-up, compiling), then cfg["images"] timed; returns the last
    runs = [image_run(call) for _ in range(1 + cfg["images"])]
    res["first_image_s"] = runs[0][0]
    if len(runs) > 1:
        res["image_s"] = statistics.median(r[0] for r in runs[1:])
        res["its"] = statistics.median(r[1] for r in runs[1:])
    return runs[-1][2]
def unet_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    lat = cfg["size"] // 8
    x = torch.randn(2, 4, lat, lat, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    z = torch.randn(1, 4, lat, lat, generator=g)
    put = lambda a: None if a is None else a.to(dev, dtype)
    sdxl = None
    if cfg["adm"]:  # SDXL's vector: the pooled text, then six size/crop numbers (diffusers: text_embeds, time_ids)
        pooled = torch.randn(2, cfg["adm"] - 6 * cfg["time_dim"], generator=g)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
        sdxl = (put(pooled), put(ids))
    return put(x), torch.tensor([500.0, 500.0], device=dev), put(ctx), sdxl, put(z)
res = {{}}
if cuda:
    torch.cuda.reset_peak_memory_stats()
"""

FINISH = """
if cuda:
    res["peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9
res["device_name"] = torch.cuda.get_device_name() if cuda else "cpu"
print(json.dumps(res))
"""

OURS = (
    COMMON
    + """
import latentforge
t = time.perf_counter()
pipe = latentforge.load(cfg["folder"], device=cfg["device"], dtype=cfg["dtype"])
sync(); res["load_s"] = time.perf_counter() - t
res["unet_dtype"], res["vae_dtype"] = str(pipe.unet.dtype), str(pipe.vae.dtype)
res["dtype_reason"] = pipe.info.dtype_reason if pipe.info else None
if cfg["compile"]:
    pipe.compile(mode=cfg["compile"])
call = lambda: pipe.txt2img(PROMPT, steps=cfg["steps"], seed=1, sampler="Euler", width=cfg["size"],
                            height=cfg["size"], cfg_scale=7.0, progress=lambda p: stamp()).images[0]
with torch.inference_mode():
    np.save(cfg["image_out"], np.asarray(images(call)))
    if cfg["reps"]:
        from latentforge.conditioning.vectors import sdxl_vector
        x, ts, ctx, sdxl, z = unet_inputs(pipe.unet.dtype)
        y = sdxl_vector(*sdxl, cfg["time_dim"]) if sdxl else None
        xf = x.float()  # the samplers give the UNet fp32 latents: the same call, so torch.compile does not recompile
        step = lambda: pipe.unet(xf, ts, ctx, y)
        res["unet_step_s"] = median_s(step, cfg["reps"])
        np.save(cfg["unet_out"], step().float().cpu().numpy())
        res["vae_decode_s"] = median_s(lambda: pipe.vae.decode(z.to(pipe.vae.dtype)), cfg["reps"])
"""
    + FINISH
).replace("PROMPT", repr(PROMPT))

THEIRS = (
    COMMON
    + """
import diffusers
dtype = {{"fp16": torch.float16, "fp32": torch.float32}}[cfg["dtype"]]
cls = diffusers.StableDiffusionXLPipeline if cfg["adm"] else diffusers.StableDiffusionPipeline
extra = {{}} if cfg["adm"] else {{"safety_checker": None, "requires_safety_checker": False}}
t = time.perf_counter()
pipe = cls.from_pretrained(cfg["folder"], torch_dtype=dtype, **extra).to(dev)
sync(); res["load_s"] = time.perf_counter() - t
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
pipe.unet.to(memory_format=torch.channels_last)
res["unet_dtype"], res["vae_dtype"] = str(pipe.unet.dtype), str(pipe.vae.dtype)
if cfg["compile"]:
    pipe.unet = torch.compile(pipe.unet, mode=cfg["compile"])
def on_step(p, i, t, kw):
    stamp()
    return kw
call = lambda: pipe(PROMPT, num_inference_steps=cfg["steps"], guidance_scale=7.0, height=cfg["size"],
                    width=cfg["size"], generator=torch.Generator().manual_seed(1),
                    callback_on_step_end=on_step).images[0]
with torch.inference_mode():
    images(call)
    if cfg["reps"]:
        x, ts, ctx, sdxl, z = unet_inputs(dtype)
        added = {{"text_embeds": sdxl[0], "time_ids": sdxl[1]}} if sdxl else None
        # called as the pipeline calls it (one timestep, the same keywords), so torch.compile does not recompile
        step = lambda: pipe.unet(x, ts[0], encoder_hidden_states=ctx, timestep_cond=None, cross_attention_kwargs=None,
                                 added_cond_kwargs=added, return_dict=False)[0]
        res["unet_step_s"] = median_s(step, cfg["reps"])
        np.save(cfg["unet_out"], step().float().cpu().numpy())
        res["vae_decode_s"] = median_s(lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample, cfg["reps"])
"""
    + FINISH
).replace("PROMPT", repr(PROMPT))

# part -> (family, text width, SDXL vector width or 0, its size embeddings' width, full size, full steps)
FAMILIES = {"sd15": ("sd1", 768, 0, 0, 512, 50), "sdxl": ("sdxl-base", 2048, 2816, 256, 1024, 30)}
TINY_WIDTHS = {"sd1": (128, 0, 0), "sdxl-base": (256, 128 + 6 * 8, 8)}  # tests/tiny.py


class Run:
    """The results so far, written after every part to --out (atomically) and kept on the way."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.results: dict = {"parts": {}, "errors": {}, "skipped": []}
        self.workdir: Path = args.workdir

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def write(self) -> None:
        if self.args.out:
            out = Path(self.args.out)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "gpu.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
            os.replace(tmp, out / "gpu.json")

    def child(self, code: str, cfg: dict) -> dict:
        """``code`` in a fresh process with ``cfg``; it may run a minute past the budget, no longer."""
        limit = max(30.0, self.left() + 60)
        return run_child(code.format(cfg=json.dumps(cfg)), timeout=limit, env={"PYTHONPATH": _pythonpath()})


def _pythonpath() -> str:
    return os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")] if p)


def model_folder(run: Run, family: str) -> Path:
    """The part's random-weight diffusers folder, written once."""
    tag = "tiny" if run.args.tiny else "fp16"
    folder = run.workdir / f"gpu-{family}-{tag}"
    if not (folder / "model_index.json").exists():
        print(f"writing a random {family} model to {folder} ...", flush=True)
        cfg = {"family": family, "folder": str(folder), "device": run.args.device, "dtype": "fp16"}
        code = WRITE_TINY.replace("{tests!r}", repr(str(ROOT / "tests"))) if run.args.tiny else WRITE
        run.child(code, cfg)
    return folder


def library_cfg(run: Run, part: str, **over) -> dict:
    fam, ctx, adm, time_dim, size, steps = FAMILIES[part]
    if run.args.tiny:
        ctx, adm, time_dim = TINY_WIDTHS[fam]
        size, steps = 64, 4
    gpu = run.args.device.startswith("cuda")
    cfg = {
        "device": run.args.device,
        "folder": str(model_folder(run, fam)),
        "size": size,
        "steps": run.args.steps or steps,
        "context_dim": ctx,
        "adm": adm,
        "time_dim": time_dim,
        "images": run.args.images,
        "reps": run.args.reps,
        "compile": None,
        "dtype": "fp16" if gpu else "fp32",
        "image_out": str(run.workdir / f"gpu-{part}-image.npy"),
        "unet_out": str(run.workdir / f"gpu-{part}-unet.npy"),
    }
    cfg.update(over)
    return cfg


def part_images(run: Run, part: str) -> dict:
    """One family: latentforge and diffusers at their defaults on the device, and latentforge in fp32."""
    import numpy as np

    ours_cfg = library_cfg(run, part, dtype=None if run.args.device.startswith("cuda") else "fp32")
    rows = {}
    print(f"{part}: latentforge ...", flush=True)
    rows["latentforge"] = run.child(OURS, ours_cfg)
    print(f"{part}: diffusers ...", flush=True)
    theirs_cfg = dict(ours_cfg, dtype="fp16" if run.args.device.startswith("cuda") else "fp32")
    theirs_cfg["unet_out"] = str(run.workdir / f"gpu-{part}-unet-diffusers.npy")
    rows["diffusers"] = run.child(THEIRS, theirs_cfg)
    ours_unet, theirs_unet = np.load(ours_cfg["unet_out"]), np.load(theirs_cfg["unet_out"])
    rel = np.sqrt(((ours_unet - theirs_unet) ** 2).mean() / (theirs_unet**2).mean())
    quality = {"unet_rel_rms_vs_diffusers": float(rel)}
    if run.args.psnr and run.left() > 0:
        print(f"{part}: latentforge fp32 image ...", flush=True)
        exact_cfg = dict(ours_cfg, dtype="fp32", reps=0, images=1, image_out=str(run.workdir / f"gpu-{part}-fp32.npy"))
        rows["latentforge fp32"] = run.child(OURS, exact_cfg)
        quality["image_psnr_vs_fp32_dB"] = psnr(
            np.load(ours_cfg["image_out"]).astype(np.float64), np.load(exact_cfg["image_out"]).astype(np.float64)
        )
    return {"rows": rows, "quality": quality, "size": ours_cfg["size"], "steps": ours_cfg["steps"]}


def part_compile(run: Run) -> dict:
    cfg = library_cfg(run, run.args.compile_family, compile=run.args.compile_mode, reps=run.args.reps)
    if run.args.device.startswith("cuda"):
        cfg["dtype"] = None
    rows = {}
    print("compile: latentforge ...", flush=True)
    rows["latentforge compiled"] = run.child(OURS, dict(cfg, image_out=str(run.workdir / "gpu-compile-image.npy")))
    print("compile: diffusers ...", flush=True)
    theirs = dict(cfg, dtype="fp16" if run.args.device.startswith("cuda") else "fp32")
    try:  # latentforge's row is kept when diffusers' run fails or runs out of time
        theirs["unet_out"] = str(run.workdir / "gpu-compile-unet-d.npy")
        rows["diffusers compiled"] = run.child(THEIRS, theirs)
    except Exception as e:
        print(f"compile: diffusers failed: {str(e)[-300:]}", flush=True)
    return {"rows": rows, "mode": run.args.compile_mode, "family": run.args.compile_family}


def part_server(run: Run) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_server_batch.py"), "--device", run.args.device]
    cmd += ["--clients", "8", "--requests", str(run.args.server_requests), "--max-batch", "1,8"]
    cmd += ["--model", str(model_folder(run, "sd1")), "--out", str(run.workdir / "gpu-server.json")]
    cmd += ["--size", "64", "--steps", "4"] if run.args.tiny else ["--size", "512", "--steps", "20"]
    cmd += ["--workdir", str(run.workdir)]
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, run.left() + 120), env=env)
    if proc.returncode:
        raise RuntimeError(f"bench_server_batch.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout, flush=True)
    return {"server": json.loads((run.workdir / "gpu-server.json").read_text())}


def report(part: str, result: dict) -> None:
    cols = ["lib", "first_image_s", "image_s", "its", "unet_step_s", "vae_decode_s", "load_s", "peak_gpu_GB",
            "unet_dtype", "vae_dtype"]  # fmt: skip
    rows = [{"lib": name, **r} for name, r in result.get("rows", {}).items()]
    if rows:
        print(table(rows, [c for c in cols if any(c in r for r in rows)]))
        ours = next((r for n, r in result["rows"].items() if n.startswith("latentforge")), None)
        theirs = next((r for n, r in result["rows"].items() if n.startswith("diffusers")), None)
        if ours and theirs:
            if ours.get("its") and theirs.get("its"):
                print(f"{part}: latentforge it/s {ours['its'] / theirs['its']:.2f}x diffusers'")
            for key in ("image_s", "unet_step_s", "vae_decode_s"):
                if ours.get(key) and theirs.get(key):
                    print(f"{part}: latentforge {key} {ours[key] / theirs[key]:.2f}x diffusers' time")
    for k, v in result.get("quality", {}).items():
        print(f"{part}: {k} = {v:.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sd15,sdxl,compile,server")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny models at 64 px, 4 steps: checks the script")
    ap.add_argument("--budget", type=float, default=500, help="seconds; parts not started by then are skipped")
    ap.add_argument("--images", type=int, default=2, help="timed images per library after the first")
    ap.add_argument("--reps", type=int, default=10, help="timed UNet steps and VAE decodes")
    ap.add_argument("--steps", type=int, help="sampling steps (default 50 for sd15, 30 for sdxl)")
    ap.add_argument("--no-psnr", dest="psnr", action="store_false", help="skip latentforge's fp32 images")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--compile-family", default="sd15", choices=["sd15", "sdxl"], help="the model of the compile part")
    ap.add_argument("--server-requests", type=int, default=2, help="requests per client in the server part")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--out", help="folder for gpu.json (the device tool's $OUT)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    probe = "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available()}))"
    run.results["torch"] = run_child(probe)
    print(f"torch {run.results['torch']}", flush=True)
    for part in args.parts.split(","):
        if run.left() <= 0:
            run.results["skipped"].append(part)
            print(f"{part}: skipped (budget spent)", flush=True)
            run.write()  # --out's gpu.json is all that comes back from the device: it says what was skipped
            continue
        t = time.perf_counter()
        try:
            if part in FAMILIES:
                result = part_images(run, part)
            elif part == "compile":
                result = part_compile(run)
            elif part == "server":
                result = part_server(run)
            else:
                raise SystemExit(f"unknown part {part!r}; use sd15, sdxl, compile, server")
            result["part_s"] = time.perf_counter() - t
            run.results["parts"][part] = result
            report(part, result)
        except Exception:
            run.results["errors"][part] = traceback.format_exc()[-4000:]
            print(f"{part}: FAILED\n{run.results['errors'][part]}", flush=True)
        run.write()
    print(f"saved {save('gpu-tiny' if args.tiny else 'gpu', run.results)}")
    if run.results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
