"""Read architectures from the key names and tensor shapes of a checkpoint (no tensor data is read).

Sizes (widths, depths, level counts) come from the shapes; what weights cannot tell (heads, group
norm groups, the x4 upscaler's cross-only attention, activations) comes from the family.

Names and shapes come from untrusted files: block indices in key names are bounded (``MAX_INDEX``)
before they are used as counts, every shape is checked for its rank before it is indexed, the work is
linear in the number of keys, and each inferred config passes ``models.limits`` before it is returned.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from latentforge.families.base import Signature, TextEncoderSpec
from latentforge.io.tensorfile import CheckpointError, short
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.limits import (
    MAX_LEVELS,
    MAX_RES_BLOCKS,
    MAX_TEXT_LAYERS,
    MAX_TRANSFORMER_DEPTH,
    check_text_config,
    check_unet_config,
    check_vae_config,
)
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

Shapes = Mapping[str, tuple[int, ...]]


class ArchitectureError(CheckpointError):
    """The tensors do not form an architecture latentforge can build."""


# the largest block index a key name may carry: a UNet has at most levels * (res blocks + 1) input blocks
MAX_INDEX = max(MAX_LEVELS * (MAX_RES_BLOCKS + 1), MAX_TRANSFORMER_DEPTH, MAX_TEXT_LAYERS)


def _index(key: str, digits: str) -> int:
    if len(digits) > 6 or int(digits) > MAX_INDEX:
        raise ArchitectureError(
            f"key {short(key)} has block index {short(digits)}, above latentforge's limit of {MAX_INDEX} "
            "(MAX_INDEX, far above any real model)"
        )
    return int(digits)


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {_index(k, m.group(1)) for k in shapes if (m := rx.match(k))}


def _need(shapes: Shapes, key: str, rank: int | None = None) -> tuple[int, ...]:
    if key not in shapes:
        raise ArchitectureError(f"expected tensor {key!r} is missing")
    shape = shapes[key]
    if rank is not None and len(shape) != rank:
        raise ArchitectureError(f"tensor {key!r} has shape {short(list(shape))}; expected {rank} dimensions")
    return shape


_TRANSFORMER = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.")


def _depths(shapes: Shapes) -> dict[str, set[int]]:
    """{block prefix: transformer block indices}, in one pass over the keys."""
    out: dict[str, set[int]] = {}
    for k in shapes:
        if m := _TRANSFORMER.match(k):
            out.setdefault(m.group(1), set()).add(_index(k, m.group(2)))
    return out


def unet_layout(shapes: Shapes) -> tuple[int, int]:
    """(levels, res blocks per level) of a UNet in original key names."""
    downs = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.weight$")
    blocks = _indices(shapes, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise ArchitectureError("no UNet input blocks found")
    levels = len(downs) + 1
    if levels > MAX_LEVELS:
        raise ArchitectureError(f"{levels} UNet levels, above latentforge's limit of {MAX_LEVELS} (MAX_LEVELS)")
    n_blocks = max(blocks) + 1  # conv_in + levels * n + (levels - 1) downsamplers
    n, rem = divmod(n_blocks - 1 - (levels - 1), levels)
    if rem or n < 1:
        raise ArchitectureError(f"{n_blocks} input blocks do not divide into {levels} levels")
    if n > MAX_RES_BLOCKS:
        raise ArchitectureError(f"{n} res blocks per level, above latentforge's limit of {MAX_RES_BLOCKS}")
    return levels, n


def unet_signature_parts(shapes: Shapes) -> dict:
    """The UNet part of a detection signature."""
    levels, n = unet_layout(shapes)
    attn_levels = tuple(
        level for level in range(levels) if f"input_blocks.{1 + level * (n + 1)}.1.norm.weight" in shapes
    )
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    label = "adm" if "label_emb.0.0.weight" in shapes else "classes" if "label_emb.weight" in shapes else "none"
    return dict(
        unet_in=_need(shapes, "input_blocks.0.0.weight", 4)[1],
        label=label,
        proj="linear" if proj and len(proj[0]) == 2 else "conv",
        levels=levels,
        attn_levels=attn_levels,
    )


def infer_unet_config(shapes: Shapes, policy: UNetConfig) -> UNetConfig:
    """Full UNet config from shapes; heads, norm groups, cross-only flags and upcast from ``policy``."""
    levels, n = unet_layout(shapes)
    conv_in = _need(shapes, "input_blocks.0.0.weight", 4)
    mc = conv_in[0]
    if mc < 1:
        raise ArchitectureError(f"tensor 'input_blocks.0.0.weight' has shape {list(conv_in)}: no channels")
    blocks = _depths(shapes)

    def _depth(prefix: str) -> int:
        return len(blocks.get(prefix, ()))

    mult = []
    depth = []
    for level in range(levels):
        first = 1 + level * (n + 1)
        width = _need(shapes, f"input_blocks.{first}.0.out_layers.3.weight", 4)[0]
        if width % mc:
            raise ArchitectureError(f"level {level} width {width} is not a multiple of model channels {mc}")
        mult.append(width // mc)
        depths = {_depth(f"input_blocks.{first + j}.1") for j in range(n)}
        if len(depths) != 1:
            raise ArchitectureError(f"level {level} has uneven transformer depths {sorted(depths)}")
        depth.append(depths.pop())
    depth_out = []
    for level in range(levels):
        first = (levels - 1 - level) * (n + 1)
        depths = {_depth(f"output_blocks.{first + j}.1") for j in range(n + 1)}
        if len(depths) != 1:
            raise ArchitectureError(f"output level {level} has uneven transformer depths {sorted(depths)}")
        depth_out.append(depths.pop())
    ctx = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2]
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    cfg = dataclasses.replace(
        policy,
        in_channels=conv_in[1],
        out_channels=_need(shapes, "out.2.weight", 4)[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=n,
        transformer_depth=tuple(depth),
        transformer_depth_out=tuple(depth_out) if depth_out != depth else None,
        transformer_depth_middle=_depth("middle_block.1"),
        context_dim=ctx[0][1] if ctx else policy.context_dim,
        use_linear_proj=bool(proj) and len(proj[0]) == 2,
        adm_in_channels=_need(shapes, "label_emb.0.0.weight", 2)[1] if "label_emb.0.0.weight" in shapes else None,
        num_classes=_need(shapes, "label_emb.weight", 2)[0] if "label_emb.weight" in shapes else None,
        cross_only=policy.cross_only[:levels] if policy.cross_only else (),
    )
    if _need(shapes, "time_embed.0.weight", 2)[0] != cfg.time_embed_dim:
        raise ArchitectureError("time embedding width is not 4 x model channels")
    if cfg.head_channels and any(mc * m % cfg.head_channels for m, d in zip(mult, depth) if d):
        raise ArchitectureError(
            f"widths {[mc * m for m in mult]} are not multiples of {cfg.head_channels} channels per head"
        )
    return check_unet_config(cfg)


def vae_levels(shapes: Shapes) -> int:
    return len(_indices(shapes, r"encoder\.down\.(\d+)\."))


def infer_vae_config(shapes: Shapes, policy: VAEConfig) -> VAEConfig:
    base = _need(shapes, "encoder.conv_in.weight", 4)
    levels = vae_levels(shapes)
    if not 1 <= levels <= MAX_LEVELS:
        raise ArchitectureError(f"{levels} VAE levels; latentforge supports 1 to {MAX_LEVELS} (MAX_LEVELS)")
    if base[0] < 1:
        raise ArchitectureError(f"tensor 'encoder.conv_in.weight' has shape {list(base)}: no channels")
    mult = []
    for i in range(levels):
        width = _need(shapes, f"encoder.down.{i}.block.0.conv2.weight", 4)[0]
        if width % base[0]:
            raise ArchitectureError(f"VAE level {i} width {width} is not a multiple of base channels {base[0]}")
        mult.append(width // base[0])
    cfg = dataclasses.replace(
        policy,
        in_channels=base[1],
        out_channels=_need(shapes, "decoder.conv_out.weight", 4)[0],
        base_channels=base[0],
        channel_mult=tuple(mult),
        num_res_blocks=len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=_need(shapes, "decoder.conv_in.weight", 4)[1],
        embed_dim=_need(shapes, "quant_conv.weight", 4)[0] // 2,
    )
    return check_vae_config(cfg)


def infer_text_config(shapes: Shapes, spec: TextEncoderSpec) -> TextEncoderConfig:
    """Text encoder config from Hugging Face key names (``text_model.`` already removed)."""
    vocab, width = _need(shapes, "embeddings.token_embedding.weight", 2)
    if width < 1 or width % spec.head_channels:
        raise ArchitectureError(f"text width {width} is not a multiple of {spec.head_channels} channels per head")
    proj = shapes.get("text_projection.weight")
    cfg = dataclasses.replace(
        spec.config,
        vocab_size=vocab,
        max_positions=_need(shapes, "embeddings.position_embedding.weight", 2)[0],
        width=width,
        layers=len(_indices(shapes, r"encoder\.layers\.(\d+)\.")),
        heads=width // spec.head_channels,
        mlp_width=_need(shapes, "encoder.layers.0.mlp.fc1.weight", 2)[0],
        projection_dim=proj[0] if proj is not None and len(proj) == 2 and spec.pooled else None,
    )
    return check_text_config(cfg)


def make_signature(unet_shapes: Shapes, vae_shapes: Shapes, text: tuple[str, ...]) -> Signature:
    return Signature(**unet_signature_parts(unet_shapes), text=tuple(sorted(text)), vae_levels=vae_levels(vae_shapes))
