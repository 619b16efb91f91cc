"""Where latentforge's native kernels run their parallel loops: PyTorch's own OpenMP threads against threads
started per call (the fallback build, ``nn.native.build(openmp=False)``).

    python benchmarks/bench_runtime.py [--rounds 2] [--reps 5] [--size 512]

One CFG step (batch 2) of the full-size SD1.5-shaped UNet with random weights, bf16, inside
``packed_session(repeated=True)`` as a generation runs it, each library in a fresh process, alternating
``--rounds`` times; ``--reps`` timed steps after a warm-up step. Reports min/median seconds, CPU time over
wall time (2.0 = both cores busy the whole step on a 2-core machine), and whether both builds gave the
same output bits. Results: stdout and benchmarks/results/runtime.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_child, save, table

CHILD = """
import functools, json, time, hashlib
import torch
from latentforge.nn import native
if not cfg["openmp"]:
    native.build = functools.partial(native.build, openmp=False)
from latentforge.device import to_fast_layout
from latentforge.families import get_family
from latentforge.models import UNet
from latentforge.nn.packed import packed_session
torch.manual_seed(0)
model = to_fast_layout(UNet(get_family("sd1").unet).eval()).to(torch.bfloat16)
n = cfg["size"] // 8
x = torch.randn(2, 4, n, n).bfloat16(); t = torch.tensor([500.0, 500.0]); ctx = torch.randn(2, 77, 768).bfloat16()
wall, cpu = [], []
with torch.inference_mode(), packed_session(model, repeated=True):
    out = model(x, t, ctx)
    for _ in range(cfg["reps"]):
        c0, t0 = time.process_time(), time.perf_counter()
        model(x, t, ctx)
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
digest = hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()
print(json.dumps({"runtime": native.runtime(), "wall": wall, "cpu": cpu, "digest": digest}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"openmp": [], "threads": []}
    for r in range(args.rounds):
        for name in ("threads", "openmp") if r % 2 == 0 else ("openmp", "threads"):
            cfg = {"openmp": name == "openmp", "reps": args.reps, "size": args.size}
            res = run_child(f"cfg = {cfg!r}\n" + CHILD)
            if res["runtime"] != name:
                raise RuntimeError(f"asked for the {name} build, got {res['runtime']!r} (no OpenMP in the compiler?)")
            print(f"round {r + 1}: {name}: median {statistics.median(res['wall']):.3f} s", flush=True)
            runs[name].append(res)
    rows = []
    for name, results in runs.items():
        wall = [w for res in results for w in res["wall"]]
        cpu = [c for res in results for c in res["cpu"]]
        rows.append({"kernels' threads": name, "step min s": min(wall), "step median s": statistics.median(wall),
                     "CPU / wall": sum(cpu) / sum(wall)})  # fmt: skip
    same = len({res["digest"] for results in runs.values() for res in results}) == 1
    print(f"SD1.5 UNet CFG step at {args.size} px, bf16, packed session")
    print(table(rows, list(rows[0])))
    print(f"threads per call / OpenMP (medians): {rows[1]['step median s'] / rows[0]['step median s']:.2f}x; "
          f"same output bits: {same}")  # fmt: skip
    print("saved", save("runtime", {"rows": rows, "same_bits": same, "raw": runs}))


if __name__ == "__main__":
    main()
