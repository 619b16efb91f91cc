"""Sane maxima for architectures read from untrusted files (key names, tensor shapes, ``config.json``).

Every released Stable Diffusion model is far inside these bounds (the largest, SDXL: 3 levels of 2 res
blocks, transformer depth 10, widths up to 1280, 70 transformer blocks; bigG: 32 layers of width 1280).
They exist so that a small hostile file cannot make the loader loop or allocate for an absurd
architecture before failing: every size is checked here, before any network is built, and a value out
of range is a CheckpointError naming the field, the value and the limit.
"""

from __future__ import annotations

import math

from latentforge.io.tensorfile import CheckpointError, short
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

MAX_LEVELS = 8  # resolution levels of a UNet or VAE (real: 3 or 4)
MAX_RES_BLOCKS = 16  # res blocks per level (real: 2)
MAX_TRANSFORMER_DEPTH = 64  # transformer blocks after one res block (real: up to 10)
MAX_TRANSFORMER_BLOCKS = 1024  # transformer blocks in a whole UNet (real: up to 70)
MAX_WIDTH = 16384  # channels of any layer, context and projection widths (real: up to 2048)
MAX_IO_CHANNELS = 1024  # image/latent channels in and out (real: up to 9)
MAX_HEADS = 1024  # attention heads (real: up to 20)
MAX_MULT = 64  # channel multiplier of a level (real: up to 4)
MAX_VECTOR = 65536  # SDXL-style vector input width (real: 2816)
MAX_CLASSES = 100_000  # class-embedding rows (real: 1000)
MAX_TEXT_LAYERS = 256  # text-encoder layers (real: up to 32)
MAX_VOCAB = 1_000_000  # token-embedding rows (real: 49408)
MAX_POSITIONS = 8192  # text positions (real: 77)
MAX_MLP = 65536  # text-encoder MLP width (real: 5120)
MAX_UPSCALER_BLOCKS = 256  # RRDB blocks or compact convs of an ESRGAN-family upscaler (real: 23, 32)
MAX_UPSAMPLES = 4  # x2 upsampling stages of an upscaler (real: 2)
LIMITS = {k: v for k, v in globals().items() if k.startswith("MAX_")}


def check_size(value: object, field: str, limit: str, *, minimum: int = 1) -> int:
    """``value`` as an int in [minimum, LIMITS[limit]]; a CheckpointError naming ``field`` otherwise."""
    maximum = LIMITS[limit]
    if type(value) is not int:
        raise CheckpointError(f"{field} is {short(value)}; it must be an integer")
    if value < minimum:
        raise CheckpointError(f"{field} is {value}; it must be at least {minimum}")
    if value > maximum:
        raise CheckpointError(
            f"{field} is {short(value)}, above latentforge's limit of {maximum} ({limit}, far above any real model)"
        )
    return value


def _divides(width: int, by: int, field: str, what: str) -> None:
    if width % by:
        raise CheckpointError(f"{field}: width {width} is not a multiple of {by} {what}")


def check_unet_config(cfg: UNetConfig) -> UNetConfig:
    """Raise CheckpointError unless every size of ``cfg`` is a positive integer within the limits."""
    check_size(cfg.in_channels, "UNet in_channels", "MAX_IO_CHANNELS")
    check_size(cfg.out_channels, "UNet out_channels", "MAX_IO_CHANNELS")
    mc = check_size(cfg.model_channels, "UNet model_channels", "MAX_WIDTH")
    levels = check_size(len(cfg.channel_mult), "UNet level count", "MAX_LEVELS")
    n = check_size(cfg.num_res_blocks, "UNet res blocks per level", "MAX_RES_BLOCKS")
    groups = check_size(cfg.norm_groups, "UNet norm_groups", "MAX_HEADS")
    _divides(mc, groups, "UNet model_channels", "norm groups")
    depth_out = cfg.depth_out
    if len(cfg.transformer_depth) != levels or len(depth_out) != levels or len(cfg.cross_only) > levels:
        raise CheckpointError(
            f"UNet transformer depths {short(cfg.transformer_depth)} / {short(depth_out)} do not give one depth "
            f"for each of the {levels} levels"
        )
    total = check_size(
        cfg.transformer_depth_middle, "UNet middle transformer depth", "MAX_TRANSFORMER_DEPTH", minimum=0
    )
    for level, (m, d, d_out) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth, depth_out)):
        check_size(m, f"UNet channel multiplier of level {level}", "MAX_MULT")
        width = check_size(mc * m, f"UNet width of level {level}", "MAX_WIDTH")
        _divides(width, groups, f"UNet level {level}", "norm groups")
        check_size(d, f"UNet transformer depth of level {level}", "MAX_TRANSFORMER_DEPTH", minimum=0)
        check_size(d_out, f"UNet output transformer depth of level {level}", "MAX_TRANSFORMER_DEPTH", minimum=0)
        total += n * d + (n + 1) * d_out
        if d or d_out:
            if cfg.head_channels:
                check_size(cfg.head_channels, "UNet channels per head", "MAX_WIDTH")
                _divides(width, cfg.head_channels, f"UNet level {level}", "channels per head")
            else:
                check_size(cfg.num_heads, "UNet num_heads", "MAX_HEADS")
                _divides(width, cfg.num_heads, f"UNet level {level}", "heads")  # type: ignore[arg-type]
    check_size(total, "UNet transformer block count", "MAX_TRANSFORMER_BLOCKS", minimum=0)
    check_size(cfg.context_dim, "UNet context_dim", "MAX_WIDTH")
    if cfg.adm_in_channels is not None:
        check_size(cfg.adm_in_channels, "UNet vector input width (adm_in_channels)", "MAX_VECTOR")
    if cfg.num_classes is not None:
        check_size(cfg.num_classes, "UNet num_classes", "MAX_CLASSES")
    return cfg


def check_vae_config(cfg: VAEConfig) -> VAEConfig:
    """Raise CheckpointError unless every size of ``cfg`` is a positive integer within the limits."""
    check_size(cfg.in_channels, "VAE in_channels", "MAX_IO_CHANNELS")
    check_size(cfg.out_channels, "VAE out_channels", "MAX_IO_CHANNELS")
    base = check_size(cfg.base_channels, "VAE base channels", "MAX_WIDTH")
    check_size(len(cfg.channel_mult), "VAE level count", "MAX_LEVELS")
    check_size(cfg.num_res_blocks, "VAE res blocks per level", "MAX_RES_BLOCKS")
    check_size(cfg.z_channels, "VAE latent channels", "MAX_IO_CHANNELS")
    check_size(cfg.embed_dim, "VAE embed_dim", "MAX_IO_CHANNELS")
    groups = check_size(cfg.norm_groups, "VAE norm_groups", "MAX_HEADS")
    for level, m in enumerate(cfg.channel_mult):
        check_size(m, f"VAE channel multiplier of level {level}", "MAX_MULT")
        _divides(check_size(base * m, f"VAE width of level {level}", "MAX_WIDTH"), groups, "VAE", "norm groups")
    return cfg


def check_text_config(cfg: TextEncoderConfig) -> TextEncoderConfig:
    """Raise CheckpointError unless every size of ``cfg`` is a positive integer within the limits."""
    check_size(cfg.vocab_size, "text encoder vocab_size", "MAX_VOCAB")
    check_size(cfg.max_positions, "text encoder max_position_embeddings", "MAX_POSITIONS")
    width = check_size(cfg.width, "text encoder hidden_size", "MAX_WIDTH")
    check_size(cfg.layers, "text encoder num_hidden_layers", "MAX_TEXT_LAYERS")
    _divides(width, check_size(cfg.heads, "text encoder num_attention_heads", "MAX_HEADS"), "text encoder", "heads")
    check_size(cfg.mlp_width, "text encoder intermediate_size", "MAX_MLP")
    if cfg.projection_dim is not None:
        check_size(cfg.projection_dim, "text encoder projection_dim", "MAX_WIDTH")
    if cfg.activation not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"text encoder hidden_act is {short(cfg.activation)}; supported: 'quick_gelu', 'gelu'")
    eps = cfg.layer_norm_eps
    if type(eps) not in (int, float) or not (math.isfinite(eps) and 0 < eps < 1):
        raise CheckpointError(f"text encoder layer_norm_eps is {short(eps)}; it must be a number in (0, 1)")
    return cfg
