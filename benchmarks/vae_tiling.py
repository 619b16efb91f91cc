"""Decoding a large image with a full-size SD VAE (random weights): peak memory with and without tiles.

    python benchmarks/vae_tiling.py [--size 2048] [--dtype bf16] [--no-whole]

Runs in fresh processes: the automatic tiled decode of a size x size image, and (unless --no-whole)
the whole-image decode, reporting seconds and peak resident memory; saves results/vae_tiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PEAK_RSS, run_child, save, table

CHILD = (
    PEAK_RSS
    + """
import time, torch
from latentforge.families import get_family
from latentforge.models import AutoencoderKL
cfg = json.loads('''{cfg}''')
torch.manual_seed(0)
vae = AutoencoderKL(get_family("sd1").vae).to(getattr(torch, cfg["dtype"])).eval()
z = torch.randn(1, 4, cfg["size"] // 8, cfg["size"] // 8)
base = rss_now()
with torch.inference_mode():
    t = time.perf_counter()
    image = vae.decode(z, tile=None if cfg["tiled"] else 0)
    sec = time.perf_counter() - t
print(json.dumps({{"s": sec, "peak_rss": peak() - base, "finite": bool(torch.isfinite(image).all())}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-whole", action="store_true", help="skip the untiled decode (it needs much more memory)")
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    rows = []
    for tiled in [True] if args.no_whole else [True, False]:
        print(f"decoding {args.size}x{args.size} {'in tiles' if tiled else 'whole'} ...", flush=True)
        r = run_child(CHILD.format(cfg=json.dumps(dict(size=args.size, dtype=dtype, tiled=tiled))), timeout=7200)
        rows.append(
            {
                "decode": "tiled (automatic)" if tiled else "whole image",
                "seconds": r["s"],
                "peak_rss_GB": r["peak_rss"] / 1e9,
                "finite": r["finite"],
            }
        )
    print(table(rows, ["decode", "seconds", "peak_rss_GB", "finite"]))
    print(f"saved {save('vae_tiling', {'size': args.size, 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
