"""Does a generation collapse when another process wants the same cores? (issue 16, "no collapse under load")

    python benchmarks/bench_load.py [--tiny] [--rounds 2] [--reps 3] [--parts demo,unet] [--no-openvino]

Times the demo image (the bundled demo model, 64 px, 20 steps, through ``txt2img`` and its automatic
thread choice) and a full-size SD1.5 UNet CFG step at 512 (``bench_openvino.py``'s random-weight model;
``--tiny``: the tests' tiny SD1 model at 64 px), each in a fresh process, once on an idle machine and once
while a second CPU-bound process (a matmul loop on as many threads as there are usable cores, pinned to
the same cores, OpenMP's default waiting) runs. Configurations:

- ``spin, all cores``: OpenMP's default waiting (threads spin), every usable core (latentforge before issue 16)
- ``passive, auto``: ``OMP_WAIT_POLICY=PASSIVE`` and ``threads.auto_threads``' default, every usable
  core (what latentforge does now)
- ``passive, free``: PASSIVE and ``LATENTFORGE_THREADS=free`` (one thread for small models, else the
  cores free at the start)
- ``openvino``: the UNet step compiled by OpenVINO (bf16 where the CPU has it), when installed

Reports min/median seconds and the ratios of issue 16's targets: demo image loaded/idle (<= 2x),
latentforge's loaded UNet step over OpenVINO's loaded step (<= 1.2x), and idle PASSIVE over idle spin
(an idle machine should lose nothing). Results: stdout and benchmarks/results/load[-tiny].json. The
timings only mean something on a machine that nothing else loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_openvino import INPUTS, child, convert_for_openvino, prepare
from common import machine, run_child, save, table

LOAD = """
import os, sys, torch
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
torch.set_num_threads(int(sys.argv[2]))
a = torch.randn(1024, 1024)
while True:
    a @ a
"""

DEMO = """
import latentforge
from latentforge.demo import bundled_model_path
pipe = latentforge.load(bundled_model_path())
used = []
run = lambda: pipe.txt2img("a red circle on a blue background", steps=cfg["steps"], seed=1, width=64, height=64,
                           progress=lambda p: used.append(torch.get_num_threads()))
res = {"times": times(run, cfg["reps"]), "threads": used[-1]}
print(json.dumps(res))
"""

UNET = (
    """
import latentforge
from latentforge.threads import auto_threads
from latentforge.nn.packed import packed_session
pipe = latentforge.load(cfg["folder"])
"""
    + INPUTS
    + """
work = sum(p.numel() for p in pipe.unet.parameters()) * H * H * 2
# as a generation runs the UNet: automatic threads, convolution weights packed once
with torch.inference_mode(), auto_threads(work) as n, packed_session(pipe.unet, repeated=True):
    res = {"times": times(lambda: pipe.unet(x, t, ctx), cfg["reps"]), "threads": n}
print(json.dumps(res))
"""
)

OV_UNET = (
    """
import openvino as ov
hint = {"INFERENCE_PRECISION_HINT": "bf16" if cfg["bf16"] else "f32", "PERFORMANCE_HINT": "LATENCY"}
net = ov.Core().compile_model(cfg["ir"]["unet"], "CPU", hint).create_infer_request()
"""
    + INPUTS
    + """
feed = [x.numpy(), t.numpy(), ctx.numpy()]
print(json.dumps({"times": times(lambda: net.infer(feed), cfg["reps"])}))
"""
)


def configs(cores: int) -> dict[str, dict]:
    """name: environment of the timed child (children import torch before latentforge, so the
    variable given here is what OpenMP sees)."""
    return {
        "spin, all cores": {"OMP_WAIT_POLICY": None, "LATENTFORGE_THREADS": str(cores), "OMP_NUM_THREADS": None},
        "passive, auto": {"OMP_WAIT_POLICY": "PASSIVE", "LATENTFORGE_THREADS": None, "OMP_NUM_THREADS": None},
        "passive, free": {"OMP_WAIT_POLICY": "PASSIVE", "LATENTFORGE_THREADS": "free", "OMP_NUM_THREADS": None},
    }


class Load:
    """A second CPU-bound process on the same cores, for the duration of a ``with`` block."""

    def __init__(self, cpus: set[int]):
        self.args = [sys.executable, "-c", LOAD, ",".join(map(str, sorted(cpus))), str(len(cpus))]
        self.env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}

    def __enter__(self) -> Load:
        self.proc = subprocess.Popen(self.args, env=self.env)
        time.sleep(3)  # torch imported, the loop running
        if self.proc.poll() is not None:
            raise RuntimeError("the load process ended early")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(code: str, env: dict, loaded: bool, cpus: set[int]) -> dict:
    if not loaded:
        return run_child(code, timeout=3600, env=env)
    with Load(cpus):
        return run_child(code, timeout=3600, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--tiny", action="store_true", help="tiny SD1 model at 64 px instead of full size; 4 demo steps")
    ap.add_argument("--parts", default="demo,unet")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()
    cpus = os.sched_getaffinity(0)
    parts = args.parts.split(",")
    bf16 = bool(machine().get("cpu_bf16"))
    jobs: list[tuple[str, str, str, dict]] = []  # (part, config, code, env)
    if "demo" in parts:
        cfg = dict(reps=args.reps, steps=4 if args.tiny else 20)
        jobs += [("demo image", name, child(DEMO, cfg), env) for name, env in configs(len(cpus)).items()]
    if "unet" in parts:
        folder, size, ctx_dim = prepare(args.workdir, args.tiny)
        cfg = dict(folder=str(folder), size=size, ctx_dim=ctx_dim, reps=args.reps, bf16=bf16)
        jobs += [("UNet step", name, child(UNET, cfg), env) for name, env in configs(len(cpus)).items()]
        if not args.no_openvino and importlib.util.find_spec("openvino") is not None:
            cfg["ir"] = convert_for_openvino(folder, size, ctx_dim)
            jobs.append(("UNet step", "openvino", child(OV_UNET, cfg), {}))
    samples: dict[tuple[str, str, str], list[float]] = {}
    threads: dict[tuple[str, str, str], int] = {}
    for r in range(args.rounds):
        for part, name, code, env in jobs:
            for state in ("idle", "loaded"):
                print(f"round {r + 1}/{args.rounds}: {part}, {name}, {state} ...", flush=True)
                res = measure(code, env, state == "loaded", cpus)
                samples.setdefault((part, name, state), []).extend(res["times"])
                if "threads" in res:
                    threads[(part, name, state)] = res["threads"]
    rows = []
    med = {k: statistics.median(v) for k, v in samples.items()}
    for (part, name, state), v in samples.items():
        row = {"part": part, "config": name, "state": state, "min_s": min(v), "median_s": med[(part, name, state)]}
        row["threads"] = threads.get((part, name, state), "")
        if state == "loaded":
            row["loaded_over_idle"] = med[(part, name, state)] / med[(part, name, "idle")]
        rows.append(row)
    print(table(rows, ["part", "config", "state", "threads", "min_s", "median_s", "loaded_over_idle"]))
    verdict = []

    def ratio(a, b, what, limit=None):
        if a in med and b in med:
            value = med[a] / med[b]
            mark = "" if limit is None else (": met" if value <= limit else ": NOT met")
            verdict.append(f"{what}: {value:.2f}x" + (f" (target <= {limit}x){mark}" if limit else ""))

    ratio(("demo image", "passive, auto", "loaded"), ("demo image", "passive, auto", "idle"), "demo loaded/idle", 2.0)
    ratio(
        ("demo image", "spin, all cores", "loaded"),
        ("demo image", "spin, all cores", "idle"),
        "demo loaded/idle before",
    )
    ratio(
        ("UNet step", "passive, auto", "loaded"),
        ("UNet step", "openvino", "loaded"),
        "UNet loaded / OpenVINO loaded",
        1.2,
    )
    ratio(
        ("UNet step", "spin, all cores", "loaded"), ("UNet step", "openvino", "loaded"), "UNet loaded / OpenVINO before"
    )
    for part in ("demo image", "UNet step"):
        ratio((part, "passive, auto", "idle"), (part, "spin, all cores", "idle"), f"{part} idle passive/spin")
    for line in verdict:
        print(line)
    raw = {" | ".join(k): v for k, v in samples.items()}
    print(f"saved {save('load-tiny' if args.tiny else 'load', {'rows': rows, 'verdict': verdict, 'raw': raw})}")


if __name__ == "__main__":
    main()
