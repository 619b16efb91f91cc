"""Decoding a large image with a full-size SD VAE (random weights): peak memory with and without tiles.

    python benchmarks/vae_tiling.py [--size 2048] [--dtype bf16] [--no-whole] [--limit-gb 12]

Runs in fresh processes: the automatic tiled decode of a size x size image, and (unless --no-whole)
the whole-image decode, reporting seconds and peak resident memory; saves results/vae_tiling.json.
The whole-image decode runs under an address-space cap (--limit-gb) so that running out of memory
is reported instead of bringing the machine down.
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
from latentforge.device import to_fast_layout
from latentforge.models import AutoencoderKL
cfg = json.loads('''{cfg}''')
torch.manual_seed(0)
vae = to_fast_layout(AutoencoderKL(get_family("sd1").vae).to(getattr(torch, cfg["dtype"])).eval())  # as load() does
z = torch.randn(1, 4, cfg["size"] // 8, cfg["size"] // 8)
base = rss_now()
if cfg["limit_gb"]:  # address-space cap: an allocation past it fails cleanly instead of invoking the OOM killer
    cap = base + int(cfg["limit_gb"] * 1e9) + (8 << 30)  # 8 GiB of slack for mapped-but-unused address space
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    with torch.inference_mode():
        t = time.perf_counter()
        image = vae.decode(z, tile=None if cfg["tiled"] else 0)
        sec = time.perf_counter() - t
    print(json.dumps({{"s": sec, "peak_rss": peak() - base, "finite": bool(torch.isfinite(image).all())}}))
except RuntimeError as e:  # torch's "not enough memory" under the cap
    print(json.dumps({{"error": str(e).splitlines()[0][:200]}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-whole", action="store_true", help="skip the untiled decode (it needs much more memory)")
    ap.add_argument(
        "--limit-gb", type=float, default=12.0, help="memory the untiled decode may take before it is stopped (0: none)"
    )
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    rows = []
    for tiled in [True] if args.no_whole else [True, False]:
        print(f"decoding {args.size}x{args.size} {'in tiles' if tiled else 'whole'} ...", flush=True)
        limit = 0.0 if tiled else args.limit_gb
        cfg = dict(size=args.size, dtype=dtype, tiled=tiled, limit_gb=limit)
        r = run_child(CHILD.format(cfg=json.dumps(cfg)), timeout=7200)
        row = {"decode": "tiled (automatic)" if tiled else "whole image"}
        if "error" in r:
            row["note"] = f"stopped at the {limit:g} GB cap"
            row["error"] = r["error"]
            print(f"  {r['error']}")
        else:
            row.update(seconds=r["s"], peak_rss_GB=r["peak_rss"] / 1e9, finite=r["finite"])
        rows.append(row)
    print(table(rows, ["decode", "seconds", "peak_rss_GB", "finite", "note"]))
    print(f"saved {save('vae_tiling', {'size': args.size, 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
