"""Full-size parity for SD1.5 and SDXL (UNet, VAE, text encoders). Slow: minutes and ~12 GB of memory.

Run with ``make test-slow`` (or ``pytest -m slow -s`` to see the figures). The reference models are
built at full size with random weights, run, saved as diffusers folders and freed before latentforge
loads them, so the two never need to be in memory together.
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import latentforge
from latentforge.conditioning import sdxl_vector
from test_detection import DIFFUSERS_UNETS
from tiny import close, perturb, write_tokenizer_files

pytestmark = pytest.mark.slow

CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu"
)
BIG_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
)
VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
)
PROMPT = ["a photograph of an astronaut riding a horse on the moon, highly detailed"]


def _text(cfg: dict, proj: bool, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, **cfg)
    return perturb((CLIPTextModelWithProjection if proj else CLIPTextModel)(config), seed, 0.01)


def _report(what: str, ours, ref) -> None:
    ok, diff, scale = close(ours, ref)
    print(f"  {what:<28} max |diff| {diff:.3g}  output scale {scale:.3g}  ratio {diff / scale:.2e}")
    assert ok, f"{what}: {diff:.3g} > 1e-4 x {scale:.3g}"


@torch.no_grad()
def _compare(folder, reference: dict, family: str, tmp_path) -> None:
    for path_kind in ("folder", "single"):
        if path_kind == "folder":
            pipe = latentforge.load(folder)
        else:
            single = tmp_path / "model.safetensors"
            if not single.exists():
                latentforge.load(folder).save(single)
                gc.collect()
            pipe = latentforge.load(single)
        assert pipe.family.name == family
        print(f"{family} via {path_kind}:")
        x, t, ctx, y = reference["unet_in"]
        _report("UNet", pipe.unet(x, t, ctx, y), reference["unet_out"])
        _report("VAE decode", pipe.vae.decode(reference["z"]), reference["decoded"])
        _report("VAE encode (mean)", pipe.vae.encode(reference["image"]), reference["encoded"])
        emb = pipe.encode_prompt(PROMPT)
        _report("prompt context", emb.context, reference["context"])
        if "pooled" in reference:
            _report("pooled", emb.pooled, reference["pooled"])
        del pipe
        gc.collect()


def _vae_reference(folder, scale: float, out: dict) -> None:
    torch.manual_seed(11)
    vae = perturb(AutoencoderKL(**VAE, scaling_factor=scale), 11, 0.01)
    g = torch.Generator().manual_seed(12)
    out["z"] = torch.randn(1, 4, 32, 32, generator=g)
    out["image"] = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    out["decoded"] = vae.decode(out["z"] / scale).sample
    out["encoded"] = vae.encode(out["image"]).latent_dist.mean * scale
    vae.save_pretrained(folder / "vae")


@torch.no_grad()
def test_sd15_full_size(tmp_path):
    folder = tmp_path / "sd15"
    ref: dict = {}
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(**DIFFUSERS_UNETS["sd1"]), 0, 0.01)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = (
        torch.randn(2, 4, 64, 64, generator=g),
        torch.tensor([999.0, 20.5]),
        torch.randn(2, 77, 768, generator=g),
    )
    ref["unet_in"] = (x, t, ctx, None)
    ref["unet_out"] = unet(x, t, encoder_hidden_states=ctx).sample
    unet.save_pretrained(folder / "unet")
    del unet
    _vae_reference(folder, 0.18215, ref)
    text = _text(CLIP_L, False, 3)
    write_tokenizer_files(folder / "tokenizer", "<|endoftext|>")
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")(
        PROMPT, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    ref["context"] = text(ids).last_hidden_state
    text.save_pretrained(folder / "text_encoder")
    del text
    gc.collect()
    _compare(folder, ref, "sd1", tmp_path)


@torch.no_grad()
def test_sdxl_full_size(tmp_path):
    folder = tmp_path / "sdxl"
    ref: dict = {}
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(**DIFFUSERS_UNETS["sdxl-base"]), 0, 0.01)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500.0])
    ctx, pooled = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    ref["unet_in"] = (x, t, ctx, sdxl_vector(pooled, ids, 256))
    added = {"text_embeds": pooled, "time_ids": ids}
    ref["unet_out"] = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    unet.save_pretrained(folder / "unet")
    del unet
    gc.collect()
    _vae_reference(folder, 0.13025, ref)
    from transformers import CLIPTokenizer

    hidden = []
    for i, (cfg, proj, sub, pad) in enumerate([(CLIP_L, False, "", "<|endoftext|>"), (BIG_G, True, "_2", "!")]):
        enc = _text(cfg, proj, 3 + i)
        write_tokenizer_files(folder / f"tokenizer{sub}", pad)
        tok = CLIPTokenizer.from_pretrained(folder / f"tokenizer{sub}")
        out = enc(
            tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids, output_hidden_states=True
        )
        hidden.append(out.hidden_states[-2])
        if proj:
            ref["pooled"] = out.text_embeds
        enc.save_pretrained(folder / f"text_encoder{sub}")
        del enc, out
        gc.collect()
    ref["context"] = torch.cat(hidden, dim=-1)
    _compare(folder, ref, "sdxl-base", tmp_path)


def test_sd15_single_file_load_peak_memory(tmp_path):
    """Loading a full-size SD1.5-shaped fp16 file peaks at most ~1.3x the weights (benchmarks/load_memory.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "load_memory.py"), "--dtype", "fp16", "--workdir", str(tmp_path)],
        check=True,
    )
    rows = json.loads((root / "benchmarks" / "results" / "load_memory_fp16.json").read_text())["rows"]
    ours = next(r for r in rows if r["loader"] == "latentforge" and r["layout"] == "single-file")
    print(f"peak above baseline {ours['peak_above_baseline_GB']:.2f} GB for {ours['weights_GB']:.2f} GB of weights")
    assert ours["peak_over_weights"] <= 1.3
