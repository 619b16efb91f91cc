"""One CFG step of a full-size SDXL-shaped UNet (random weights) at a reduced size, latentforge vs diffusers.

    python benchmarks/bench_sdxl_unet.py [--size 512] [--dtype bf16]

Each library runs in a fresh process (the bf16 UNet is 5 GB); prints seconds, ratio, GFLOP/s and peak
RSS, and saves benchmarks/results/sdxl_unet.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TIMER, run_child, save, table

CHILD = (
    TIMER
    + """
cfg = json.loads('''{cfg}''')
dtype = getattr(torch, cfg["dtype"])
base = rss_now()
torch.manual_seed(0)
if cfg["lib"] == "diffusers":
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(addition_embed_type="text_time", addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True).to(dtype).eval()
    if cfg["channels_last"]:
        unet.to(memory_format=torch.channels_last)
else:
    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import UNet
    unet = to_fast_layout(UNet(get_family("sdxl-base").unet).to(dtype).eval())  # as load() does
n = cfg["size"] // 8
x = torch.randn(2, 4, n, n).to(dtype); ctx = torch.randn(2, 77, 2048).to(dtype); t = torch.tensor([500.0, 500.0])
pooled = torch.randn(2, 1280).to(dtype); s = float(cfg["size"]); ids = torch.tensor([[s, s, 0.0, 0.0, s, s]] * 2)
if cfg["lib"] == "diffusers":
    added = {{"text_embeds": pooled, "time_ids": ids}}
    f = lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
else:
    from latentforge.conditioning import sdxl_vector
    y = sdxl_vector(pooled, ids, 256).to(dtype)
    f = lambda: unet(x, t, ctx, y)
with torch.inference_mode():
    sec, _ = timed(f, cfg["reps"])
    count = flops(f)
print(json.dumps({{"s": sec, "flops": count, "peak_rss": peak() - base}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    rows = []
    for name, lib, cl in [
        ("diffusers", "diffusers", False),
        ("diffusers + channels-last", "diffusers", True),
        ("latentforge", "ours", False),
    ]:
        cfg = dict(lib=lib, dtype=dtype, size=args.size, reps=args.reps, channels_last=cl)
        print(f"running {name} ...", flush=True)
        r = run_child(CHILD.format(cfg=json.dumps(cfg)), timeout=7200)
        rows.append(
            {"run": name, "cfg_step_s": r["s"], "GFLOPs": r["flops"] / r["s"] / 1e9, "peak_rss_GB": r["peak_rss"] / 1e9}
        )
    for row in rows:
        row["speedup_vs_diffusers"] = rows[0]["cfg_step_s"] / row["cfg_step_s"]
    print(f"SDXL UNet, one CFG step (batch 2) at {args.size}x{args.size}, {args.dtype}")
    print(table(rows, ["run", "cfg_step_s", "speedup_vs_diffusers", "GFLOPs", "peak_rss_GB"]))
    print(f"saved {save('sdxl_unet', {'size': args.size, 'dtype': args.dtype, 'rows': rows})}")


if __name__ == "__main__":
    main()
