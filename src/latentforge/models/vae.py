"""The KL-regularised autoencoder (AutoencoderKL) that maps images to Stable Diffusion latents.

Module names equal the original checkpoint names (``first_stage_model.`` stripped): ``encoder.down.{i}
.block.{j}``, ``decoder.up.{i}.upsample``, ``mid.attn_1.{q,k,v,proj_out}``, ``quant_conv`` ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge import allocator
from latentforge.nn import GroupNorm32, attention, packed, winograd
from latentforge.nn.circular import is_circular
from latentforge.nn.packed import packed_session
from latentforge.nn.tiling import tiled_apply
from latentforge.nn.upsample import upsample_conv


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL (Rombach et al. 2022). f = 2^(len(channel_mult) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return GroupNorm32(cfg.norm_groups, channels, eps=1e-6)


def _add(skip: Tensor, h: Tensor) -> Tensor:
    """``skip + h`` where ``h`` is a fresh layer output: without autograd added into ``h``, so that the
    decoder's large maps (fp32 at 512 px: 128-256 MB each) do not take one more fresh block per block."""
    grad = torch.is_grad_enabled() and (skip.requires_grad or h.requires_grad)
    if grad or h.shape != skip.shape or h.dtype != skip.dtype:
        return skip + h
    return h.add_(skip)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = _norm(cfg, out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = packed.norm_silu_conv(self.norm1, self.conv1, x)  # conv1(norm1(x, silu=True)), fused where it can
        if self.training and self.dropout.p:
            h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        else:  # dropout is the identity
            h = packed.norm_silu_conv(self.norm2, self.conv2, h)
        return _add(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1 convolutions, scale C^-0.5."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return _add(x, self.proj_out(out))


class Downsample(nn.Module):
    """Stride-2 conv after padding right and bottom by one (asymmetric, as the original)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv)  # nearest x2, then the conv (nn/upsample.py)


class _Mid(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        mults = (1, *cfg.channel_mult)
        for i in range(len(cfg.channel_mult)):
            level = nn.Module()
            c_in, c_out = ch * mults[i], ch * mults[i + 1]
            level.block = nn.ModuleList(
                ResnetBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)
            )
            if i != len(cfg.channel_mult) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        top = ch * cfg.channel_mult[-1]
        self.mid = _Mid(cfg, top)
        self.norm_out = _norm(cfg, top)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.base_channels
        top = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _Mid(cfg, top)
        levels = len(cfg.channel_mult)
        up: list[nn.Module] = [None] * levels  # type: ignore[list-item]
        c = top
        for i in reversed(range(levels)):
            level = nn.Module()
            c_out = ch * cfg.channel_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(cfg, c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)
            )
            c = c_out
            if i != 0:
                level.upsample = Upsample(c_out)
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h, silu=True))


@contextlib.contextmanager
def cpu_fast_path(vae: nn.Module, x: Tensor):
    """On the CPU, the VAE's large activations reuse freed memory instead of page-faulting fresh pages
    (``latentforge.allocator``), and in bf16, or fp32 for full-size VAEs, its weights are prepared once
    (``nn.packed.packed_session``: 3x3 convolutions by Winograd, ``nn/winograd.py``); elsewhere nothing.
    The transformed bf16 filters (180 MB for the SD VAE, 0.2 s to make) are not kept after the call: the
    VAE runs once per generation, and kept they would sit through the UNet's sampling, the other memory
    peak. The Winograd filters another session made for itself alone (the UNet's smaller maps) are
    dropped first."""
    if x.device.type != "cpu":
        yield
        return
    dtype = next(vae.parameters()).dtype
    # fp32: full-size VAEs only (their wide levels run by Winograd in PyTorch ops, nn/winograd.py); small
    # ones keep PyTorch's convolutions
    wide = dtype == torch.float32 and max(m.in_channels for m in _convs(vae)) >= winograd.FP32_MIN_CHANNELS
    packed.shed()  # another session's filters made only for it (the UNet's smaller maps): not through our peak
    session = packed_session(vae, keep=True) if dtype == torch.bfloat16 or wide else contextlib.nullcontext()
    with allocator.reusing(), session:
        yield


def _convs(module: nn.Module):
    yield from (m for m in module.modules() if isinstance(m, nn.Conv2d))


class AutoencoderKL(nn.Module):
    """VAE with ``encode`` (image in [-1, 1] -> scaled latent) and ``decode`` (scaled latent -> image).

    ``scale`` is the family's latent scale factor (0.18215 SD1/SD2, 0.13025 SDXL, 0.08333 x4).
    """

    def __init__(self, cfg: VAEConfig, scale: float = 0.18215):
        super().__init__()
        self.config = cfg
        self.scale = scale
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    # automatic tiling above these sizes (latent pixels); tiles and overlaps in latent pixels
    auto_tile_above = 128 * 128
    tile_size, tile_overlap = 96, 24

    def _tile_for(self, h: int, w: int, tile: int | None) -> int:
        if tile is None:
            return self.tile_size if h * w > self.auto_tile_above else 0
        return tile

    def encode_moments(self, image: Tensor, tile: int | None = None) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the posterior, unscaled; logvar clamped to [-30, 20]. ``tile`` (latent
        pixels): None = automatic for large images, 0 = never, n = tiles of n latent pixels."""
        f = self.config.downscale
        tile = self._tile_for(image.shape[-2] // f, image.shape[-1] // f, tile)

        def run(x: Tensor) -> Tensor:
            return self.quant_conv(self.encoder(x.to(self.dtype)))

        with cpu_fast_path(self, image):
            if tile and (image.shape[-2] > tile * f or image.shape[-1] > tile * f):
                overlap = min(self.tile_overlap, tile // 4)
                wrap = is_circular(self)  # tiling: the tiles go round (nn/tiling.py)
                moments = tiled_apply(run, image, tile * f, overlap * f, up=1, down=f, wrap=wrap).to(self.dtype)
            else:
                moments = run(image)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None, tile: int | None = None
    ) -> Tensor:
        """Scaled latent of ``image`` (B, 3, H, W) in [-1, 1]: the posterior mean, or a sample from it.

        A sample draws mean + std * N(0, I) with ``generator`` (noise made on the generator's device).
        """
        mean, logvar = self.encode_moments(image, tile)
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return z * self.scale

    def decode(self, latent: Tensor, tile: int | None = None) -> Tensor:
        """Image in (about) [-1, 1] from a scaled latent (B, embed_dim, h, w). Large latents are decoded
        in blended tiles (``tile``: None automatic, 0 never, n latent pixels per tile), which go round the
        edges while the convolutions pad circularly (tiling, ``nn/circular.py``)."""
        tile = self._tile_for(latent.shape[-2], latent.shape[-1], tile)

        def run(z: Tensor) -> Tensor:
            return self.decoder(self.post_quant_conv(z.to(self.dtype) / self.scale))

        with cpu_fast_path(self, latent):
            if tile and (latent.shape[-2] > tile or latent.shape[-1] > tile):
                overlap = min(self.tile_overlap, tile // 4)
                return tiled_apply(run, latent, tile, overlap, up=self.config.downscale, wrap=is_circular(self))
            return run(latent)
