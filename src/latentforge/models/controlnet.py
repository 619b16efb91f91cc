"""ControlNet (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder (input blocks and middle block, built from ``models/unet.py``'s
blocks) takes the noisy latent plus a control image encoded by the hint encoder, and returns one residual
per skip connection and one for the middle block, each through a zero-initialised 1x1 convolution.

Module names are the original layout's (``control_model.`` stripped): ``time_embed``, ``label_emb``
(SDXL), ``input_hint_block.{0,2,...}``, ``input_blocks``, ``zero_convs.N.0``, ``middle_block``,
``middle_block_out.0``. The diffusers ``ControlNetModel`` layout maps onto these with ``diffusers_key``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentforge.convert.diffusers import unet_key
from latentforge.models.unet import (
    ControlResiduals,
    TimestepEmbedSequential,
    UNetConfig,
    encoder_blocks,
    middle_block,
)
from latentforge.nn import timestep_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    """The encoder's UNet config (output-side fields unused) and the hint encoder's widths: 3 -> w0,
    then per width a 3x3 conv and a stride-2 conv to the next, then a conv to ``model_channels``."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class ControlNet(nn.Module):
    """Called as ``net(x, timesteps, context, hint, y=None)`` -> ``ControlResiduals(output=[...], middle=...)``.

    x: the UNet's scaled latent input (B, in_channels, h, w); hint: the control image (B, 3, 8h, 8w) in
    [0, 1] for the standard 8x VAE (the hint encoder downsamples by 2 per width step)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )
        widths = config.hint_widths
        hint: list[nn.Module] = [_conv(config.hint_channels, widths[0]), nn.SiLU()]
        for a, b in itertools.pairwise(widths):
            hint += [_conv(a, a), nn.SiLU(), _conv(a, b, stride=2), nn.SiLU()]
        hint.append(_conv(widths[-1], mc))
        self.input_hint_block = TimestepEmbedSequential(*hint)

        def zero(ch: int) -> TimestepEmbedSequential:
            return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))

        self.input_blocks, channels = encoder_blocks(cfg)  # the UNet's own encoder, as a copy to train
        self.zero_convs = nn.ModuleList([zero(c) for c in channels])
        self.middle_block = middle_block(cfg, channels[-1])
        self.middle_block_out = zero(channels[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self, x: Tensor, timesteps: Tensor | float, context: Tensor, hint: Tensor, y: Tensor | None = None
    ) -> ControlResiduals:
        cfg = self.config.unet
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))
        if cfg.adm_in_channels is not None:
            if y is None:
                raise ValueError("this ControlNet (SDXL) takes the vector input y")
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype), emb, context)
        h = x.to(dtype)
        outs: list[Tensor | None] = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(output=outs, middle=self.middle_block_out(h, emb, context))


def diffusers_key(key: str, num_res_blocks: int, hint_convs: int) -> str:
    """Original ControlNet key (``control_model.`` stripped) -> diffusers ``ControlNetModel`` key; the encoder's
    keys go through the UNet table of ``convert/diffusers.py``. ``hint_convs``: convolutions in the hint encoder."""
    if m := re.match(r"input_hint_block\.(\d+)\.(weight|bias)$", key):
        idx, param = int(m.group(1)), m.group(2)
        conv = idx // 2
        if conv == 0:
            return f"controlnet_cond_embedding.conv_in.{param}"
        if conv == hint_convs - 1:
            return f"controlnet_cond_embedding.conv_out.{param}"
        return f"controlnet_cond_embedding.blocks.{conv - 1}.{param}"
    if m := re.match(r"zero_convs\.(\d+)\.0\.(weight|bias)$", key):
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if m := re.match(r"middle_block_out\.0\.(weight|bias)$", key):
        return f"controlnet_mid_block.{m.group(1)}"
    return unet_key(key, num_res_blocks)
