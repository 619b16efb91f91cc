"""The diffusers layout: key names and config.json files of UNet2DConditionModel and AutoencoderKL.

One table per direction-free mapping: ``unet_key(original) -> diffusers`` and ``vae_key(original) ->
diffusers``; loading inverts them over the keys the model expects, saving applies them.
"""

from __future__ import annotations

import re

from latentforge.io.tensorfile import CheckpointError, short
from latentforge.models.limits import check_size, check_unet_config, check_vae_config
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def unet_key(key: str, num_res_blocks: int) -> str:
    """Original UNet key (``model.diffusion_model.`` stripped) -> diffusers UNet2DConditionModel key."""
    n = num_res_blocks
    fixed = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "label_emb": "class_embedding",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", key):
        i, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(i - 1, n + 1)
        if j == n:  # the downsampler closing a level
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        if sub == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.match(r"middle_block\.(\d)\.(.+)$", key):
        sub, rest = int(m.group(1)), m.group(2)
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{sub // 2}.{_resnet(rest)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", key):
        i, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(i, n + 1)
        if sub == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise KeyError(f"no diffusers name for UNet key {key!r}")


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# names used by diffusers folders saved before diffusers 0.14
VAE_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def vae_key(key: str, levels: int) -> str:
    """Original VAE key (``first_stage_model.`` stripped) -> diffusers AutoencoderKL key."""
    key = key.replace("nin_shortcut", "conv_shortcut")
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)$", key):
        return f"{m.group(1)}.mid_block.attentions.0.{_VAE_ATTN[m.group(2)]}.{m.group(3)}"
    key = re.sub(
        r"^(encoder|decoder)\.mid\.block_(\d)\.",
        lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.",
        key,
    )
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(
        r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.", key
    )
    key = re.sub(
        r"^decoder\.up\.(\d+)\.upsample\.",
        lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.",
        key,
    )
    return key


def vae_key_to_original(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key (current or pre-0.14 attention names) -> original VAE key."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    attn = {**{v: k for k, v in _VAE_ATTN.items()}, "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)$", key):
        return f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
    key = re.sub(
        r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
        lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.",
        key,
    )
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", key
    )
    return re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.",
        key,
    )


def is_vae_attn_matrix(key: str) -> bool:
    """Original mid-attention 1x1 conv weights, stored as [C, C] linear weights by diffusers."""
    return bool(re.match(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))


# --- configs -------------------------------------------------------------------------------------

_UNET_DEFAULTS_REQUIRED = {
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "attention_type": "default",
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
}


class UnsupportedConfig(CheckpointError):
    """A config.json that latentforge cannot build: another design, or a missing, mistyped or absurd value."""


_REQUIRED = object()


def _value(cfg: dict, key: str, default=_REQUIRED):
    if key in cfg:
        return cfg[key]
    if default is _REQUIRED:
        raise UnsupportedConfig(f"'{key}' is missing")
    return default


def config_int(cfg: dict, key: str, default=_REQUIRED, *, limit: str, minimum: int = 1) -> int:
    return check_size(_value(cfg, key, default), f"'{key}'", limit, minimum=minimum)


def _per_level(cfg: dict, key: str, levels: int, default=_REQUIRED) -> list:
    """A value given once or per level, as a list of ``levels`` items."""
    value = _value(cfg, key, default)
    if not isinstance(value, (list, tuple)):
        return [value] * levels
    if len(value) != levels:
        raise UnsupportedConfig(f"'{key}' has {len(value)} entries for {levels} levels")
    return list(value)


def _depths(cfg: dict, key: str, levels: int, attn: list[bool], per_block: bool) -> tuple[int, ...]:
    out = []
    for i, (d, a) in enumerate(zip(_per_level(cfg, key, levels, 1), attn)):
        if per_block and isinstance(d, (list, tuple)) and d:
            if any(x != d[0] for x in d):
                raise UnsupportedConfig(f"'{key}'[{i}]: different transformer depths inside a level")
            d = d[0]
        out.append(check_size(d, f"'{key}'[{i}]", "MAX_TRANSFORMER_DEPTH") if a else 0)
    return tuple(out)


def _block_types(cfg: dict, key: str, levels: int) -> list[str]:
    types = _per_level(cfg, key, levels)
    if not all(isinstance(t, str) for t in types):
        raise UnsupportedConfig(f"'{key}' must be a list of block type names, not {short(types)}")
    return types


def _widths(cfg: dict) -> list[int]:
    boc = _value(cfg, "block_out_channels")
    if not isinstance(boc, (list, tuple)):
        raise UnsupportedConfig(f"'block_out_channels' is {short(boc)}; it must be a list of channel counts")
    check_size(len(boc), "the length of 'block_out_channels' (levels)", "MAX_LEVELS")
    boc = [check_size(c, f"'block_out_channels'[{i}]", "MAX_WIDTH") for i, c in enumerate(boc)]
    for i, c in enumerate(boc):
        if c % boc[0]:
            raise UnsupportedConfig(f"'block_out_channels'[{i}] = {c} is not a multiple of the first width {boc[0]}")
    return boc


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """UNet2DConditionModel config.json -> UNetConfig (raises UnsupportedConfig for other designs, and for
    missing, mistyped or out-of-range values, naming the key)."""
    if not isinstance(cfg, dict):
        raise UnsupportedConfig(f"the config is a JSON {type(cfg).__name__}, not an object")
    for k, want in _UNET_DEFAULTS_REQUIRED.items():
        if k in cfg and cfg[k] != want:
            raise UnsupportedConfig(f"UNet config has {k}={short(cfg[k])}; latentforge supports only {want!r}")
    boc = _widths(cfg)
    levels = len(boc)
    mc = boc[0]
    attn = ["CrossAttn" in t for t in _block_types(cfg, "down_block_types", levels)]
    tlpb = _per_level(cfg, "transformer_layers_per_block", levels, 1)
    if any(isinstance(x, (list, tuple)) for x in tlpb):
        raise UnsupportedConfig("per-block transformer depths inside a level are not supported")
    depth = _depths(cfg, "transformer_layers_per_block", levels, attn, False)
    middle = check_size(tlpb[-1], "'transformer_layers_per_block'[-1]", "MAX_TRANSFORMER_DEPTH")
    depth_out = None
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        rev = _depths(cfg, "reverse_transformer_layers_per_block", levels, attn[::-1], True)
        depth_out = rev[::-1]
    key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    heads = _per_level(cfg, key, levels, 8)
    heads = [check_size(h, f"'{key}'[{i}]", "MAX_WIDTH") for i, h in enumerate(heads)]
    dims = {c // h for c, h in zip(boc, heads)}
    if len(set(heads)) == 1:
        num_heads, head_channels = heads[0], None
    elif len(dims) == 1:
        num_heads, head_channels = None, dims.pop()
    else:
        raise UnsupportedConfig(f"attention heads {heads} are neither a fixed count nor a fixed width")
    only_cross = _per_level(cfg, "only_cross_attention", levels, False)
    cross_only = tuple(bool(x) for x in only_cross) if any(only_cross) else ()
    add = cfg.get("addition_embed_type")
    if add not in (None, "text_time"):
        raise UnsupportedConfig(f"addition_embed_type {short(add)} is not supported")
    lpb = _per_level(cfg, "layers_per_block", levels, 2)
    if any(x != lpb[0] for x in lpb):
        raise UnsupportedConfig("different res-block counts per level are not supported")
    classes = cfg.get("num_class_embeds")
    unet = UNetConfig(
        in_channels=config_int(cfg, "in_channels", 4, limit="MAX_IO_CHANNELS"),
        out_channels=config_int(cfg, "out_channels", 4, limit="MAX_IO_CHANNELS"),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=check_size(lpb[0], "'layers_per_block'", "MAX_RES_BLOCKS"),
        transformer_depth=depth,
        transformer_depth_out=depth_out if depth_out != depth else None,
        transformer_depth_middle=middle,
        num_heads=num_heads,
        head_channels=head_channels,
        context_dim=config_int(cfg, "cross_attention_dim", 768, limit="MAX_WIDTH"),
        use_linear_proj=bool(cfg.get("use_linear_projection", False)),
        adm_in_channels=config_int(cfg, "projection_class_embeddings_input_dim", limit="MAX_VECTOR")
        if add == "text_time"
        else None,
        num_classes=None if classes is None else config_int(cfg, "num_class_embeds", limit="MAX_CLASSES"),
        cross_only=cross_only,
        norm_groups=config_int(cfg, "norm_num_groups", 32, limit="MAX_HEADS"),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
    )
    return check_unet_config(unet)


def unet_config_to_diffusers(u: UNetConfig, sample_size: int, addition_time_embed_dim: int | None = None) -> dict:
    boc = [u.model_channels * m for m in u.channel_mult]
    attn = [d > 0 for d in u.transformer_depth]
    heads = [u.heads_for(c)[0] for c in boc]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "block_out_channels": boc,
        "layers_per_block": u.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": [max(d, 1) for d in u.transformer_depth[:-1]] + [u.transformer_depth_middle],
        "attention_head_dim": heads,
        "cross_attention_dim": u.context_dim,
        "use_linear_projection": u.use_linear_proj,
        "upcast_attention": u.upcast_attention,
        "norm_num_groups": u.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "default",
    }
    if u.transformer_depth[-1] != u.transformer_depth_middle and u.transformer_depth[-1] > 0:
        raise UnsupportedConfig("diffusers ties the middle depth to the last level's depth")
    if u.transformer_depth_out is not None:
        cfg["reverse_transformer_layers_per_block"] = [
            [max(d, 1)] * (u.num_res_blocks + 1) for d in reversed(u.depth_out)
        ]
    if u.cross_only:
        cfg["only_cross_attention"] = list(u.cross_only)
    if u.adm_in_channels:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim or 256,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    if u.num_classes:
        cfg["num_class_embeds"] = u.num_classes
    return cfg


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """AutoencoderKL config.json -> VAEConfig (UnsupportedConfig naming the key for bad values)."""
    if not isinstance(cfg, dict):
        raise UnsupportedConfig(f"the config is a JSON {type(cfg).__name__}, not an object")
    boc = _widths(cfg)
    for t in _block_types(cfg, "down_block_types", len(boc)) if "down_block_types" in cfg else []:
        if t != "DownEncoderBlock2D":
            raise UnsupportedConfig(f"VAE block type {short(t)} is not supported")
    z = config_int(cfg, "latent_channels", 4, limit="MAX_IO_CHANNELS")
    vae = VAEConfig(
        in_channels=config_int(cfg, "in_channels", 3, limit="MAX_IO_CHANNELS"),
        out_channels=config_int(cfg, "out_channels", 3, limit="MAX_IO_CHANNELS"),
        base_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=config_int(cfg, "layers_per_block", 2, limit="MAX_RES_BLOCKS"),
        z_channels=z,
        embed_dim=z,
        norm_groups=config_int(cfg, "norm_num_groups", 32, limit="MAX_HEADS"),
    )
    return check_vae_config(vae)


def vae_config_to_diffusers(v: VAEConfig, scale: float, sample_size: int) -> dict:
    if v.embed_dim != v.z_channels:
        raise UnsupportedConfig("diffusers AutoencoderKL needs embed_dim == z_channels")
    levels = len(v.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": v.in_channels,
        "out_channels": v.out_channels,
        "block_out_channels": [v.base_channels * m for m in v.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": v.num_res_blocks,
        "latent_channels": v.z_channels,
        "norm_num_groups": v.norm_groups,
        "act_fn": "silu",
        "scaling_factor": scale,
        "sample_size": sample_size,
    }
