"""Convolution and linear weights packed once (``Pipeline.pack_weights``) against PyTorch's per-call repacking.

    python benchmarks/bench_packed.py [--tiny] [--threads N] [--reps 3] [--dtype bf16]

One process, a random-weight SD1.5 UNet (``--tiny``: the demo-sized sd1 test model at 64 px) in
channels-last, one CFG step at 512x512 (batch 2) and a VAE decode, plain and packed in alternation
(``--reps`` times each, after a warm-up that packs). Reports the minimum wall and CPU seconds of each:
the CPU seconds of a one-thread run (``--threads 1``) hardly move with other processes' load, so they
compare the two forwards even on a busy machine; wall seconds need a quiet one. Also the largest
difference of the outputs and the extra memory the packed copies take. Results: stdout and
benchmarks/results/packed[-tiny].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    import torch

    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL, UNet
    from latentforge.nn.packed import _CACHE, pack_weights, unpack_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    fam = get_family("sd1")
    vae_cfg = fam.vae
    if args.tiny:
        unet_cfg = dataclasses.replace(fam.unet, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=128)
        vae_cfg = dataclasses.replace(fam.vae, base_channels=32, channel_mult=(1, 2, 2, 2))
        size = 64
    else:
        unet_cfg, size = fam.unet, 512
    unet = to_fast_layout(UNet(unet_cfg).to(dtype).eval())
    vae = to_fast_layout(AutoencoderKL(vae_cfg, fam.latent_scale).to(dtype).eval())
    h = size // 8
    x, t = torch.randn(2, 4, h, h), torch.tensor([500.0, 500.0])
    ctx, z = torch.randn(2, 77, unet_cfg.context_dim), torch.randn(1, 4, h, h)
    parts = {"unet step": (unet, lambda: unet(x, t, ctx)), "vae decode": (vae, lambda: vae.decode(z))}
    rows = []
    with torch.inference_mode():
        for name, (net, run) in parts.items():
            ref = run()
            timings = {"plain": [], "packed": []}
            diff = 0.0
            for _ in range(args.reps):
                for mode in ("plain", "packed"):
                    (pack_weights if mode == "packed" else unpack_weights)(net)
                    run()  # warm-up (packs)
                    c0, w0 = time.process_time(), time.perf_counter()
                    out = run()
                    timings[mode].append((time.perf_counter() - w0, time.process_time() - c0))
                    if mode == "packed":
                        diff = max(diff, (out.float() - ref.float()).abs().max().item())
            pack_weights(net)
            mods = set(net.modules())
            extra = sum(c["weight"].numel() * c["weight"].element_size() for m, c in _CACHE.items() if m in mods)
            unpack_weights(net)
            row = {"part": name, "max_abs_diff": diff, "packed_extra_MB": extra / 1e6}
            for mode, v in timings.items():
                row[f"{mode}_wall_s"] = min(w for w, _ in v)
                row[f"{mode}_cpu_s"] = min(c for _, c in v)
            row["cpu_speedup"] = row["plain_cpu_s"] / row["packed_cpu_s"]
            row["wall_speedup"] = row["plain_wall_s"] / row["packed_wall_s"]
            rows.append(row)
    cols = ["part", "plain_wall_s", "packed_wall_s", "wall_speedup", "plain_cpu_s", "packed_cpu_s", "cpu_speedup"]
    print(table(rows, [*cols, "max_abs_diff", "packed_extra_MB"]))
    name = "packed-tiny" if args.tiny else "packed"
    print(f"saved {save(name, {'threads': torch.get_num_threads(), 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
