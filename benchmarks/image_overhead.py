"""Where a whole txt2img's time goes beyond its components: the packed session's start and exit.

    python benchmarks/image_overhead.py [--images 2] [--steps 20] [--size 512] [--no-keep]

On the random full-size SD1.5-shaped model (``common.random_sd15``, the automatic dtype), each image is
timed in phases: start to the end of the first step (text encoding, the session packing the UNet's weights
and making Winograd filters, the first UNet call), the later steps (and how much of them the UNet calls
take), the VAE decode, and the session's exit (with ``--no-keep``, the plain weights put back; by default
the packed copies stay for the next image, ``nn/packed.py``); the seconds spent making Winograd filters
and oneDNN's packed weights, and the minor page faults of each UNet call. Then, in the same process, UNet
calls inside a session alone (what the benchmarks' "UNet step" times, after a warm-up call), for comparison.
The first image also pays one-time costs (kernels built, first touches); compare the later ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import random_sd15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument(
        "--no-keep", action="store_true", help="put the plain weights back after each image (no packed weights kept)"
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    args = ap.parse_args()

    import torch

    import latentforge
    from latentforge.nn import packed, winograd

    generate = importlib.import_module("latentforge.pipelines.generate")  # the module, not the function

    _, folder = random_sd15(args.workdir)
    pipe = latentforge.load(folder)
    marks: dict[str, float] = {}
    unet_s: list[float] = []
    faults: list[int] = []  # minor page faults of each UNet call
    prep = {"winograd": 0.0, "reorder": 0.0}  # seconds making Winograd filters and oneDNN's packed weights

    def minflt() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    forward = pipe.unet.forward

    def timed_forward(*a, **k):
        f, t = minflt(), time.perf_counter()
        out = forward(*a, **k)
        unet_s.append(time.perf_counter() - t)
        faults.append(minflt() - f)
        return out

    def timed(fn, what):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            prep[what] += time.perf_counter() - t
            return out

        return wrapper

    winograd.transform = timed(winograd.transform, "winograd")
    for name in ("_reorder_convolution_weight", "_reorder_linear_weight"):  # looked up on every call
        setattr(torch.ops.mkldnn, name, timed(getattr(torch.ops.mkldnn, name), "reorder"))

    pipe.unet.forward = timed_forward
    decode = pipe.vae.decode

    def timed_decode(*a, **k):
        marks["decode start"] = time.perf_counter()
        out = decode(*a, **k)
        marks["decode end"] = time.perf_counter()
        return out

    pipe.vae.decode = timed_decode
    session = packed.packed_session

    @contextlib.contextmanager
    def timed_session(module, repeated=False, keep=False):
        with session(module, repeated, keep and not args.no_keep) as n:
            yield n
            marks["exit start"] = time.perf_counter()
        marks["exit end"] = time.perf_counter()

    generate.packed_session = timed_session  # what generate.packing opens
    stamps: list[float] = []
    for i in range(args.images):
        marks.clear()
        unet_s.clear()
        faults.clear()
        stamps.clear()
        prep.update(winograd=0.0, reorder=0.0)
        t0 = time.perf_counter()
        pipe.txt2img(
            "a photograph of an astronaut riding a horse",
            steps=args.steps,
            seed=1,
            sampler="Euler",
            width=args.size,
            height=args.size,
            cfg_scale=7.5,
            progress=lambda p: stamps.append(time.perf_counter()),
        )
        total = time.perf_counter() - t0
        later = stamps[-1] - stamps[0]
        print(
            f"image {i}: total {total:.2f} s; start to step 1 {stamps[0] - t0:.2f} (first UNet call {unet_s[0]:.2f}); "
            f"steps 2-{len(stamps)} {later:.2f} ({later / max(1, len(stamps) - 1):.2f} per step, UNet calls "
            f"{sum(unet_s[1:]):.2f}); decode {marks['decode end'] - marks['decode start']:.2f}; "
            f"session exit {marks.get('exit end', 0) - marks.get('exit start', 0):.2f}; making Winograd filters "
            f"{prep['winograd']:.2f} s and oneDNN's packed weights {prep['reorder']:.2f} s (UNet and VAE); page "
            f"faults: first UNet call {faults[0]}, later calls at most {max(faults[1:], default=0)}",
            flush=True,
        )
    generate.packed_session = session
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    x, ctx = torch.randn(2, 4, lat, lat, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    unet_s.clear()
    with torch.inference_mode(), session(pipe.unet, repeated=True):
        for _ in range(5):
            pipe.unet(x, t, ctx)
    print(
        f"UNet calls alone in a session: first {unet_s[0]:.2f} s, then median {statistics.median(unet_s[1:]):.2f} s "
        f"({', '.join(f'{v:.2f}' for v in unet_s[1:])})"
    )


if __name__ == "__main__":
    main()
