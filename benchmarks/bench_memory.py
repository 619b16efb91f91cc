"""Where a generation's memory peaks: resident memory per phase of a full-size SD1.5 txt2img on the CPU.

    python benchmarks/bench_memory.py [--size 512] [--steps 3] [--images 2] [--malloc steps|reuse|system]

In a fresh process (the random SD1.5-shaped model of the other benchmarks, default dtype, latentforge's
default path) a thread samples the process's RSS every 2 ms while the main thread loads the model and
makes ``--images`` txt2img images one after another; each sample is charged to the phase running then:
load, and for each image its start (text encoding, the UNet's packing and first step), the sampling
steps and the VAE decode, then the rest after it. Prints the peak of each phase above the RSS before
loading (GB), and the process's overall peak (``ru_maxrss``). The second image shows the steady state
(whatever the first left behind is still there). Results: stdout and benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import random_sd15, run_child, save, table

CHILD = """
import json, resource, threading, time
import latentforge, torch

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

phase, peaks, order = ["load"], {}, ["load"]
def poll():
    while True:
        r = rss()
        if r > peaks.get(phase[0], 0):
            peaks[phase[0]] = r
        time.sleep(0.002)

def enter(name):
    if name not in order:
        order.append(name)
    phase[0] = name

threading.Thread(target=poll, daemon=True).start()
base = rss()
pipe = latentforge.load(FOLDER)
decode = pipe.vae.decode
def watched_decode(*a, **k):
    enter(f"image {current[0]}: VAE decode")
    return decode(*a, **k)
pipe.vae.decode = watched_decode
current = [0]
for i in range(1, IMAGES + 1):
    current[0] = i
    enter(f"image {i}: start (text, packing, first step)")
    pipe.txt2img("a photo of a cat", steps=STEPS, seed=i, width=SIZE, height=SIZE,
                 progress=lambda p, i=i: enter(f"image {i}: sampling steps"))
    enter(f"image {i}: after")
    time.sleep(0.05)
out = {"phases": [[name, (peaks.get(name, base) - base) / 1e9] for name in order],
       "overall_peak_GB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 1e9}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--malloc", choices=["steps", "reuse", "system"], default="steps")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    args = ap.parse_args()
    _, folder = random_sd15(args.workdir)
    code = (
        CHILD.replace("FOLDER", repr(str(folder)))
        .replace("IMAGES", str(args.images))
        .replace("STEPS", str(args.steps))
        .replace("SIZE", str(args.size))
    )
    out = run_child(code, env={"LATENTFORGE_MALLOC": args.malloc})
    rows = [{"phase": name, "peak_above_start_GB": gb} for name, gb in out["phases"]]
    print(f"SD1.5 txt2img {args.size} px, {args.steps} steps, LATENTFORGE_MALLOC={args.malloc}: peak RSS per phase")
    print(table(rows, ["phase", "peak_above_start_GB"]))
    print(f"overall peak (ru_maxrss) above the start: {out['overall_peak_GB']:.3f} GB")
    print(f"saved {save('memory', {'args': vars(args) | {'workdir': str(args.workdir)}, **out})}")


if __name__ == "__main__":
    main()
