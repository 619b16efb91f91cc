"""latentforge's fp32 AVX2 kernels (``nn/native_avx2.py``) against PyTorch's ops, on an AVX2 CPU.

    python benchmarks/bench_avx2.py [--reps 3] [--no-unet] [--no-vae] [--psnr 512] [--steps 10]

Each part runs the same inputs with the kernels on (``LATENTFORGE_KERNELS=on``) and with the part's
kernel turned off (its ``*_usable`` answering no), alternating, minimum of ``--reps`` timed calls after a
warm-up, and the largest difference of the outputs relative to their scale:

- attention at SD1.5's shapes at 512 px (first-level self-attention, cross-attention, second level)
  against SDPA;
- the UNet's FeedForward (GEGLU + output projection) at the first three levels;
- fp32 Winograd convolutions with the native transforms against the transforms in PyTorch ops;
- a ResBlock's GroupNorm + SiLU + 3x3 convolution fused (``packed.norm_silu_conv``) against the plain calls;
- a full-size SD1.5 UNet CFG step (random weights, packed session) with every AVX2 kernel against none;
- a full-size SD VAE decode at 512 px in fresh processes, the AVX2 kernels on and off (fp32 Winograd
  then with its transforms in PyTorch ops, GroupNorm + SiLU separate): seconds and the peak RSS above
  the loaded VAE (sampled every 2 ms);
- ``--psnr SIZE``: a ``--steps``-step txt2img image of bench_openvino's random SD1.5 model at SIZE px as
  latentforge makes it by default on this CPU (fp32, the AVX2 kernels, fp32 Winograd, the upsampling
  convolutions' phases) and with all of them off (``LATENTFORGE_KERNELS=off``, ``LATENTFORGE_WINOGRAD=off``:
  PyTorch's fp32 operators), each in a fresh process, and the PSNR between them (issue 16's bar: 40 dB).

Results: stdout and benchmarks/results/avx2.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import psnr, run_child, save, table, times, txt2img_images

VAE_CHILD = """
import json, os, threading, time, torch
from latentforge.device import to_fast_layout
from latentforge.families import get_family
from latentforge.models import AutoencoderKL
from latentforge.nn import native_avx2
if STATE == "off":
    native_avx2.wanted = lambda: False
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
torch.manual_seed(0)
vae = to_fast_layout(AutoencoderKL(get_family("sd1").vae).float().eval())
z = torch.randn(1, 4, 64, 64)
best, top = 1e9, 0
with torch.inference_mode():
    out = vae.decode(z)
    for _ in range(REPS):
        base, peak, stop = rss(), [0], [False]
        def watch():
            while not stop[0]:
                peak[0] = max(peak[0], rss()); time.sleep(0.002)
        th = threading.Thread(target=watch); th.start()
        t = time.perf_counter(); out = vae.decode(z); best = min(best, time.perf_counter() - t)
        stop[0] = True; th.join(); top = max(top, peak[0] - base)
torch.save(out, OUT)
print(json.dumps({"seconds": best, "peak_above_loaded_GB": top / 1e9}))
"""


def compare(name: str, make, switch, reps: int) -> dict:
    """``make()`` -> a call; ``switch(on)`` turns the part's kernel on or off. Alternating on and off."""
    import torch

    call, best, outs = make(), {}, {}
    with torch.inference_mode():
        for _ in range(2):
            for state in (True, False):
                switch(state)
                outs[state] = call()
                best[state] = min(best.get(state, 1e9), min(times(call, reps)))
    switch(True)
    scale = outs[False].abs().max().item()
    diff = (outs[True] - outs[False]).abs().max().item() / scale
    return {"part": name, "kernels s": best[True], "PyTorch s": best[False], "speedup": best[False] / best[True],
            "max rel diff": diff}  # fmt: skip


def switcher(module, names: list[str]):
    real = {n: getattr(module, n) for n in names}

    def switch(on: bool) -> None:
        for n in names:
            setattr(module, n, real[n] if on else (lambda *a, **k: False))

    return switch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-unet", action="store_true")
    ap.add_argument("--no-vae", action="store_true")
    ap.add_argument("--psnr", type=int, metavar="SIZE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    args = ap.parse_args()
    if args.psnr:
        off = {"LATENTFORGE_KERNELS": "off", "LATENTFORGE_WINOGRAD": "off"}
        images = txt2img_images(args.workdir, args.psnr, args.steps, {"default": (None, {}), "plain": (None, off)})
        db = psnr(images["default"], images["plain"])
        result = {"size": args.psnr, "steps": args.steps, "default vs plain fp32 dB": db}
        print(result, flush=True)
        print(f"saved {save('avx2_psnr', result)}")
        return
    import os

    os.environ["LATENTFORGE_KERNELS"] = "on"
    import torch

    from latentforge.nn import GroupNorm32, native_avx2, packed
    from latentforge.nn.attention import attention

    if not native_avx2.ready():
        sys.exit("the AVX2 kernels are not available here (no AVX2/FMA or no C++ compiler)")
    torch.manual_seed(0)
    rows = []
    for nq, nk, c in ((4096, 4096, 320), (4096, 77, 320), (1024, 1024, 640)):
        q, k, v = torch.randn(2, nq, c), torch.randn(2, nk, c), torch.randn(2, nk, c)
        sw = switcher(native_avx2, ["attention_usable"])
        make = lambda q=q, k=k, v=v: lambda: attention(q, k, v, 8)  # noqa: E731
        rows.append(compare(f"attention 2x{nq}x{nk}, 8 heads of {c // 8}", make, sw, args.reps))
    from latentforge.models.unet import FeedForward

    for n, c in ((4096, 320), (1024, 640), (256, 1280)):
        ff, x = FeedForward(c).eval(), torch.randn(2, n, c)
        sw = switcher(native_avx2, ["geglu_usable"])
        rows.append(compare(f"FeedForward 2x{n}x{c}", lambda ff=ff, x=x: lambda: ff(x), sw, args.reps))
    from latentforge.nn import winograd

    for n, c, k, side in ((2, 320, 320, 64), (2, 640, 640, 32), (1, 512, 512, 128), (1, 128, 128, 512)):
        conv = torch.nn.Conv2d(c, k, 3, padding=1).to(memory_format=torch.channels_last).requires_grad_(False)
        x = torch.randn(n, c, side, side).contiguous(memory_format=torch.channels_last)
        sw = switcher(native_avx2, ["winograd_usable"])
        make = lambda conv=conv, x=x: lambda: winograd.conv3x3_fp32(x, conv.weight, conv.bias)  # noqa: E731
        rows.append(compare(f"Winograd transforms {n}x{c}->{k} @{side}", make, sw, args.reps))
        norm = GroupNorm32(32, c, eps=1e-6)
        model = torch.nn.ModuleDict({"norm": norm, "conv": conv})

        make = lambda norm=norm, conv=conv, x=x: lambda: packed.norm_silu_conv(norm, conv, x)  # noqa: E731
        os.environ["LATENTFORGE_WINOGRAD"] = "on"
        with packed.packed_session(model):  # as a generation runs it: the fused path needs a session
            sw = switcher(packed, ["_norm_fusable"])
            rows.append(compare(f"GroupNorm+SiLU+conv {n}x{c}->{k} @{side}", make, sw, args.reps))
        os.environ.pop("LATENTFORGE_WINOGRAD")
    if not args.no_unet:
        from latentforge.device import to_fast_layout
        from latentforge.families import get_family
        from latentforge.models import UNet

        unet = to_fast_layout(UNet(get_family("sd1").unet).float().eval())
        x, t, ctx = torch.randn(2, 4, 64, 64), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)

        with packed.packed_session(unet, repeated=True):  # as sampling runs it
            sw = switcher(native_avx2, ["wanted"])
            make = lambda: lambda: unet(x, t, ctx)  # noqa: E731
            rows.append(compare("SD1.5 UNet CFG step at 512 px", make, sw, max(1, args.reps - 1)))
        del unet
    print(table(rows, list(rows[0])), flush=True)
    vae = []
    if not args.no_vae:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            outs = {}
            for state in ("on", "off", "on", "off"):
                out = Path(tmp) / f"{state}.pt"
                code = VAE_CHILD.replace("REPS", str(args.reps)).replace("OUT", repr(str(out)))
                res = run_child(code.replace("STATE", repr(state)), env={"OMP_NUM_THREADS": None})
                vae.append({"kernels": state, **res})
                outs[state] = torch.load(out)
            diff = ((outs["on"] - outs["off"]).abs().max() / outs["off"].abs().max()).item()
        print(table(vae, list(vae[0])))
        print(f"SD VAE decode 512 px: max rel diff on/off {diff:.2e}")
    print(f"saved {save('avx2', {'rows': rows, 'vae decode': vae})}")


if __name__ == "__main__":
    main()
