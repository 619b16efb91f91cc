"""Read architectures from the key names and tensor shapes of a checkpoint (no tensor data is read).

Sizes (widths, depths, level counts) come from the shapes; what weights cannot tell (heads, group
norm groups, the x4 upscaler's cross-only attention, activations) comes from the family.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from latentforge.families.base import Signature, TextEncoderSpec
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

Shapes = Mapping[str, tuple[int, ...]]


class ArchitectureError(ValueError):
    """The tensors do not form an architecture latentforge can build."""


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _need(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ArchitectureError(f"expected tensor {key!r} is missing")
    return shapes[key]


def unet_layout(shapes: Shapes) -> tuple[int, int]:
    """(levels, res blocks per level) of a UNet in original key names."""
    downs = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.weight$")
    blocks = _indices(shapes, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise ArchitectureError("no UNet input blocks found")
    levels = len(downs) + 1
    n_blocks = max(blocks) + 1  # conv_in + levels * n + (levels - 1) downsamplers
    n, rem = divmod(n_blocks - 1 - (levels - 1), levels)
    if rem or n < 1:
        raise ArchitectureError(f"{n_blocks} input blocks do not divide into {levels} levels")
    return levels, n


def _depth(shapes: Shapes, prefix: str) -> int:
    return len(_indices(shapes, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\."))


def unet_signature_parts(shapes: Shapes) -> dict:
    """The UNet part of a detection signature."""
    levels, n = unet_layout(shapes)
    attn_levels = tuple(
        level for level in range(levels) if f"input_blocks.{1 + level * (n + 1)}.1.norm.weight" in shapes
    )
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    label = "adm" if "label_emb.0.0.weight" in shapes else "classes" if "label_emb.weight" in shapes else "none"
    return dict(
        unet_in=_need(shapes, "input_blocks.0.0.weight")[1],
        label=label,
        proj="linear" if proj and len(proj[0]) == 2 else "conv",
        levels=levels,
        attn_levels=attn_levels,
    )


def infer_unet_config(shapes: Shapes, policy: UNetConfig) -> UNetConfig:
    """Full UNet config from shapes; heads, norm groups, cross-only flags and upcast from ``policy``."""
    levels, n = unet_layout(shapes)
    conv_in = _need(shapes, "input_blocks.0.0.weight")
    mc = conv_in[0]
    mult = []
    depth = []
    for level in range(levels):
        first = 1 + level * (n + 1)
        mult.append(_need(shapes, f"input_blocks.{first}.0.out_layers.3.weight")[0] // mc)
        depths = {_depth(shapes, f"input_blocks.{first + j}.1") for j in range(n)}
        if len(depths) != 1:
            raise ArchitectureError(f"level {level} has uneven transformer depths {sorted(depths)}")
        depth.append(depths.pop())
    depth_out = []
    for level in range(levels):
        first = (levels - 1 - level) * (n + 1)
        depths = {_depth(shapes, f"output_blocks.{first + j}.1") for j in range(n + 1)}
        if len(depths) != 1:
            raise ArchitectureError(f"output level {level} has uneven transformer depths {sorted(depths)}")
        depth_out.append(depths.pop())
    ctx = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    cfg = dataclasses.replace(
        policy,
        in_channels=conv_in[1],
        out_channels=_need(shapes, "out.2.weight")[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=n,
        transformer_depth=tuple(depth),
        transformer_depth_out=tuple(depth_out) if depth_out != depth else None,
        transformer_depth_middle=_depth(shapes, "middle_block.1"),
        context_dim=ctx[0][1] if ctx else policy.context_dim,
        use_linear_proj=bool(proj) and len(proj[0]) == 2,
        adm_in_channels=shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None,
        num_classes=shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None,
        cross_only=policy.cross_only[:levels] if policy.cross_only else (),
    )
    if _need(shapes, "time_embed.0.weight")[0] != cfg.time_embed_dim:
        raise ArchitectureError("time embedding width is not 4 x model channels")
    if cfg.head_channels and any(mc * m % cfg.head_channels for m, d in zip(mult, depth) if d):
        raise ArchitectureError(
            f"widths {[mc * m for m in mult]} are not multiples of {cfg.head_channels} channels per head"
        )
    return cfg


def vae_levels(shapes: Shapes) -> int:
    return len(_indices(shapes, r"encoder\.down\.(\d+)\."))


def infer_vae_config(shapes: Shapes, policy: VAEConfig) -> VAEConfig:
    base = _need(shapes, "encoder.conv_in.weight")
    levels = vae_levels(shapes)
    mult = tuple(_need(shapes, f"encoder.down.{i}.block.0.conv2.weight")[0] // base[0] for i in range(levels))
    return dataclasses.replace(
        policy,
        in_channels=base[1],
        out_channels=_need(shapes, "decoder.conv_out.weight")[0],
        base_channels=base[0],
        channel_mult=mult,
        num_res_blocks=len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=_need(shapes, "decoder.conv_in.weight")[1],
        embed_dim=_need(shapes, "quant_conv.weight")[0] // 2,
    )


def infer_text_config(shapes: Shapes, spec: TextEncoderSpec) -> TextEncoderConfig:
    """Text encoder config from Hugging Face key names (``text_model.`` already removed)."""
    vocab, width = _need(shapes, "embeddings.token_embedding.weight")
    if width % spec.head_channels:
        raise ArchitectureError(f"text width {width} is not a multiple of {spec.head_channels} channels per head")
    proj = shapes.get("text_projection.weight")
    return dataclasses.replace(
        spec.config,
        vocab_size=vocab,
        max_positions=_need(shapes, "embeddings.position_embedding.weight")[0],
        width=width,
        layers=len(_indices(shapes, r"encoder\.layers\.(\d+)\.")),
        heads=width // spec.head_channels,
        mlp_width=_need(shapes, "encoder.layers.0.mlp.fc1.weight")[0],
        projection_dim=proj[0] if proj is not None and spec.pooled else None,
    )


def make_signature(unet_shapes: Shapes, vae_shapes: Shapes, text: tuple[str, ...]) -> Signature:
    return Signature(**unet_signature_parts(unet_shapes), text=tuple(sorted(text)), vae_levels=vae_levels(vae_shapes))
