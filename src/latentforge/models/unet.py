"""The Stable Diffusion noise predictor: a UNet with time embedding and cross-attention transformers.

Module names equal the original (LDM/SGM ``openaimodel``) checkpoint names, so an original UNet state
dict loads after stripping ``model.diffusion_model.``. One class covers every family in
``latentforge.families`` (SD1.x, SD2.x, inpaint, depth, the x4 upscaler, SDXL base and refiner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import CrossAttention, GroupNorm32, fused, native_avx2, packed, timestep_embedding
from latentforge.nn.upsample import upsample_conv


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet (Rombach et al. 2022, the LDM noise predictor).

    ``transformer_depth[l]`` is the number of transformer blocks after each ResBlock of level ``l``
    on the way down (0 = no attention at that level); ``transformer_depth_out`` the same on the way
    up (defaults to the same list). Heads: ``head_channels`` (channels per head, SD2/SDXL) wins over
    ``num_heads`` (a fixed count, SD1 and the upscaler).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_out: tuple[int, ...] | None = None
    transformer_depth_middle: int = 1
    num_heads: int | None = 8
    head_channels: int | None = None
    context_dim: int = 768
    use_linear_proj: bool = False
    adm_in_channels: int | None = None  # SDXL "vector" input width
    num_classes: int | None = None  # x4 upscaler: Embedding(num_classes, time_embed_dim)
    cross_only: tuple[bool, ...] = ()  # per level: attn1 attends to the context (x4 upscaler)
    norm_groups: int = 32
    upcast_attention: bool = False

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def depth_out(self) -> tuple[int, ...]:
        return self.transformer_depth_out or self.transformer_depth

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) for a transformer of the given width."""
        if self.head_channels:
            return channels // self.head_channels, self.head_channels
        assert self.num_heads
        return self.num_heads, channels // self.num_heads

    def is_cross_only(self, level: int) -> bool:
        return bool(self.cross_only) and self.cross_only[level]


class ResBlock(nn.Module):
    """ResBlock with the time embedding added between the two convolutions (Ho et al. 2020)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=1e-5), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # the Sequentials' GroupNorm + SiLU run as one call (fused where nn.native can), then the rest
        norm, _, conv = self.in_layers
        h = packed.norm_silu_conv(norm, conv, x)  # conv(norm(x, silu=True)), fused where nn.packed can
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, _, dropout, conv = self.out_layers
        if dropout.training and dropout.p:
            h = conv(dropout(norm(h, silu=True)))
        else:  # dropout is the identity
            h = packed.norm_silu_conv(norm, conv, h)
        return self.skip_connection(x) + h


class GEGLUProjection(nn.Linear):
    """GEGLU's input projection: an ``nn.Linear`` in every respect (parameters, state-dict keys, adapters),
    of its own class so that weight packing (``nn.packed``) leaves it plain: the fused GEGLU
    (``nn.fused.linear_geglu``) reads the two halves of its weight."""


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): Linear(d, 2h) split as value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = GEGLUProjection(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        proj = self.proj
        hooked = proj._forward_hooks or proj._forward_pre_hooks
        if not hooked and fused.linear_geglu_usable(x, proj.weight, proj.bias):
            # bf16 on the CPU: GELU and the product as post-ops of two oneDNN matmuls (nn.fused); any hook
            # on the projection keeps the plain path
            return fused.linear_geglu(x, proj.weight, proj.bias)
        if not hooked and native_avx2.geglu_usable(x, proj.weight, proj.bias):
            # fp32 on AVX2 CPUs: the product without its bias, then bias, GELU and product in one pass
            return native_avx2.linear_geglu_fp32(x, proj.weight, proj.bias)
        value, gate = proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# (block input x (B, N, C), token grid height, width) -> (merge, unmerge) for the self-attention's tokens
TokenMerge = Callable[[Tensor, int, int], tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]


class BasicTransformerBlock(nn.Module):
    """Self-attention (or context attention when ``cross_only``), cross-attention, GEGLU MLP.

    ``token_merge``, the declared seam for token merging (ToMe for SD, Bolya & Hoffman 2023): when set
    (by the pipeline's patcher, never by hand), ``token_merge(x, h, w) -> (merge, unmerge)`` is asked once
    per call with the block's input and token grid; the self-attention then runs on ``merge(norm1(x))``
    and its output is ``unmerge``d back to every token before the residual add.
    """

    token_merge: TokenMerge | None = None

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, cross_only: bool, upcast: bool):
        super().__init__()
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, heads, dim_head, context_dim if cross_only else None, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if self.token_merge is not None and hw is not None:
            merge, unmerge = self.token_merge(x, *hw)
            x = x + unmerge(self.attn1(merge(self.norm1(x)), context if self.cross_only else None))
        else:
            x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the text context."""

    def __init__(self, channels: int, depth: int, cfg: UNetConfig, cross_only: bool):
        super().__init__()
        heads, dim_head = cfg.heads_for(channels)
        inner = heads * dim_head
        self.use_linear = cfg.use_linear_proj
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        if self.use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cfg.context_dim, cross_only, cfg.upcast_attention)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # Nearest x2; an explicit size (that of the matching skip) allows latents whose sides are not a
        # multiple of 2^levels. For exact doubling both give the same pixels.
        # (computed without the doubled map where it pays: nn/upsample.py)
        return upsample_conv(x, self.conv, size)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the embedding, transformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class ControlResiduals:
    """Residuals that control networks add inside the UNet (the seam for ControlNet and T2I-Adapter).

    ``input[i]``: added to the output of input block ``i`` (T2I-Adapter style; it then flows on and
    into the skip connection). ``middle``: added to the middle block's output. ``output[i]``: added to
    the skip connection of input block ``i`` where an output block takes it (ControlNet, Zhang et al.
    2023). Lists are indexed by input block (12 for SD1); None or a shorter list means no residual.
    """

    input: list[Tensor | None] = dataclasses.field(default_factory=list)
    middle: Tensor | None = None
    output: list[Tensor | None] = dataclasses.field(default_factory=list)

    @staticmethod
    def _at(items: list[Tensor | None], i: int) -> Tensor | None:
        return items[i] if i < len(items) else None


@dataclass
class FeatureCache:
    """Deep features kept between UNet calls (DeepCache, Ma et al. 2023, "Accelerating Diffusion Models
    for Free"): the seam through which a sampler-side schedule skips the deep part of the UNet.

    ``depth`` selects the skip branch: input blocks ``0..depth`` and the output blocks that take their
    skips (the last ``depth + 1``) form the shallow network; everything between them is the deep part.
    A call with ``features`` None runs the whole UNet and keeps the features that enter output block
    ``len(output_blocks) - 1 - depth`` (a "cache" call); a call with ``features`` of the right shape runs
    only the shallow network and takes those features from the cache instead (a "retrieve" call).
    Depth 0 is the paper's shallowest branch (the first convolution and the last output block); with two
    ResBlocks per level (SD1, SD2, SDXL) the depth equals the DeepCache package's ``cache_branch_id``.
    """

    depth: int = 0
    features: Tensor | None = None

    def usable(self, batch: int, size: tuple[int, int]) -> bool:
        f = self.features
        return f is not None and f.shape[0] == batch and tuple(f.shape[-2:]) == size


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The UNet's input blocks (the first convolution, then per level ResBlocks with optional
    transformers and a downsampler) and the channel count each block outputs; ControlNet copies them."""
    mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    channels = [mc]
    ch = mc
    levels = len(cfg.channel_mult)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, groups)]
            ch = mult * mc
            if cfg.transformer_depth[level]:
                layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg, cfg.is_cross_only(level)))
            blocks.append(TimestepEmbedSequential(*layers))
            channels.append(ch)
        if level != levels - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            channels.append(ch)
    return blocks, channels


def middle_block(cfg: UNetConfig, ch: int) -> TimestepEmbedSequential:
    """ResBlock, transformer, ResBlock at the deepest width."""
    ted, groups = cfg.time_embed_dim, cfg.norm_groups
    return TimestepEmbedSequential(
        ResBlock(ch, ted, ch, groups),
        SpatialTransformer(ch, cfg.transformer_depth_middle, cfg, False),
        ResBlock(ch, ted, ch, groups),
    )


class UNet(nn.Module):
    """The noise predictor. Called as ``unet(x, timesteps, context, y=None, control=None)``.

    x: (B, in_channels, H, W) with any task channels already concatenated; timesteps: (B,) or scalar,
    possibly fractional; context: (B, T, context_dim); y: (B, adm_in_channels) for SDXL or (B,) integer
    noise levels for the x4 upscaler; control: ``ControlResiduals`` from control networks.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        elif cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        self.input_blocks, skip_channels = encoder_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg, ch)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mc * mult, groups)]
                ch = mc * mult
                if cfg.depth_out[level]:
                    layers.append(SpatialTransformer(ch, cfg.depth_out[level], cfg, cfg.is_cross_only(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def set_upcast_attention(self, upcast: bool) -> None:
        """Compute attention in float32 under half precision (SD2 768-v needs it)."""
        self.config = dataclasses.replace(self.config, upcast_attention=upcast)
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.upcast = upcast

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float,
        context: Tensor,
        y: Tensor | None = None,
        control: ControlResiduals | None = None,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        cfg = self.config
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))
        if cfg.num_classes is not None or cfg.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet takes a vector input y (SDXL size/pooled vector or upscaler noise level)")
            y = y.long() if cfg.num_classes is not None else y.to(dtype)
            emb = emb + self.label_emb(y)

        h = x.to(dtype)
        context = context.to(dtype)
        run = self._checkpointed if self.gradient_checkpointing and self.training else self._plain
        skips = []
        branch = len(self.output_blocks) - 1 - cache.depth if cache is not None else -1  # first shallow block
        if cache is not None and not 0 <= cache.depth < len(self.input_blocks):
            raise ValueError(f"FeatureCache depth must be 0 to {len(self.input_blocks) - 1}, got {cache.depth}")
        retrieve = False
        for i, block in enumerate(self.input_blocks):
            h = run(block, h, emb, context, None)
            if control is not None and (r := control._at(control.input, i)) is not None:
                h = h + r.to(h.dtype)
            skips.append(h)
            if cache is not None and i == cache.depth:
                retrieve = cache.usable(h.shape[0], tuple(h.shape[-2:]))
                if retrieve:  # the deep part is not run: its output comes from the cache
                    break
        if retrieve:
            h = cache.features
            output_blocks = list(enumerate(self.output_blocks))[branch:]
        else:
            h = run(self.middle_block, h, emb, context, None)
            if control is not None and control.middle is not None:
                h = h + control.middle.to(h.dtype)
            output_blocks = list(enumerate(self.output_blocks))
        for j, block in output_blocks:
            if j == branch and not retrieve:
                cache.features = h
            skip = skips.pop()
            if control is not None and (r := control._at(control.output, len(skips))) is not None:
                skip = skip + r.to(skip.dtype)
            h = torch.cat([h, skip], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = run(block, h, emb, context, size)
        norm, _, conv = self.out
        return conv(norm(h, silu=True))

    # recompute each block's activations in the backward pass instead of storing them (training memory)
    gradient_checkpointing = False

    @staticmethod
    def _plain(block, h, emb, context, size):
        return block(h, emb, context, size)

    @staticmethod
    def _checkpointed(block, h, emb, context, size):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, h, emb, context, size, use_reentrant=False)
