"""MiDaS v3 DPT-Hybrid, the depth model of Stable Diffusion 2 depth-to-image.

Ranftl, Bochkovskiy, Koltun 2021, "Vision Transformers for Dense Prediction" (DPT): a ViT-B/16 whose
patch embedding is a BiT ResNet-50 stem and first three stages (weight-standardised convolutions,
GroupNorm, TF "same" padding), four feature maps reassembled from it (the first two ResNet stages and
transformer blocks 8 and 11 with their readout token projected in), RefineNet-style fusion blocks and a
small convolutional head. The released weights are ``dpt_hybrid-midas-501f0c75.pt`` (MiDaS v3, trained at
384 x 384).

Module names equal the original checkpoint's (``pretrained.model.blocks.0.attn.qkv``,
``scratch.refinenet4.resConfUnit1.conv1``, ``scratch.output_conv.0``), so that file loads by name; the
transformers ``DPTForDepthEstimation`` layout goes through one table (``models/midas_load.py``).

The output is relative inverse depth (disparity up to an unknown scale and shift): larger is nearer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import GroupNorm32, attention


@dataclass(frozen=True)
class MidasConfig:
    """The sizes of a DPT-Hybrid; the defaults are the released model's.

    ``stage_widths`` are the output widths of the ResNet stages (bottleneck width = width // 4);
    ``hooks`` the two transformer blocks whose outputs feed the third and fourth feature maps;
    ``neck_widths`` the widths those two are projected to; ``grid`` the side of the position-embedding
    grid (image size / 16).
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    layer_norm_eps: float = 1e-6
    stem_width: int = 64
    stage_widths: tuple[int, ...] = (256, 512, 1024)
    stage_depths: tuple[int, ...] = (3, 4, 9)
    norm_groups: int = 32
    hooks: tuple[int, int] = (8, 11)
    neck_widths: tuple[int, int] = (768, 768)
    fusion_width: int = 256
    head_width: int = 32
    grid: int = 24


def _same_pad(x: Tensor, kernel: int, stride: int, value: float = 0.0) -> Tensor:
    """TensorFlow "SAME" padding: output size ceil(n / stride), the odd pixel of padding at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019) with "same" padding, as BiT uses (eps 1e-8)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = ((w - mean) / torch.sqrt(var + self.eps)).to(x.dtype)
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class _Stem(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.conv = StdConv2d(3, width, 7, stride=2)
        self.norm = GroupNorm32(groups, width, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)


class _Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv = StdConv2d(cin, cout, 1, stride=stride)
        self.norm = GroupNorm32(groups, cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3), GroupNorm after each convolution, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first: bool):
        super().__init__()
        mid = cout // 4
        self.downsample = _Downsample(cin, cout, stride, groups) if first else None
        self.conv1 = StdConv2d(cin, mid, 1)
        self.norm1 = GroupNorm32(groups, mid, eps=1e-5)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNorm32(groups, mid, eps=1e-5)
        self.conv3 = StdConv2d(mid, cout, 1)
        self.norm3 = GroupNorm32(groups, cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        return F.relu(self.norm3(self.conv3(h)) + shortcut)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[_Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, groups, i == 0) for i in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class _ResNetBackbone(nn.Module):
    """BiT ResNet stem and stages (strides 4, then 1, 2, 2: total 16); returns every stage's output."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.stem = _Stem(cfg.stem_width, cfg.norm_groups)
        widths = (cfg.stem_width, *cfg.stage_widths)
        self.stages = nn.ModuleList(
            _Stage(widths[i], widths[i + 1], depth, 1 if i == 0 else 2, cfg.norm_groups)
            for i, depth in enumerate(cfg.stage_depths)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.backbone = _ResNetBackbone(cfg)
        self.proj = nn.Conv2d(cfg.stage_widths[-1], cfg.hidden_size, 1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attention(q, k, v, self.heads))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block of ViT (Dosovitskiy et al. 2021)."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = _Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViTHybrid(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, cfg.hidden_size))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        # The final LayerNorm is in the file but its output is not used by the depth model.
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """The position embedding, its grid resized bilinearly (half-pixel centres) to gh x gw."""
        tok, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        old = math.isqrt(grid.shape[0])
        grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        if (gh, gw) != (old, old):
            grid = F.interpolate(grid.float(), size=(gh, gw), mode="bilinear", align_corners=False).to(tok.dtype)
        return torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


class _ProjectReadout(nn.Module):
    """DPT's "project" readout: each token concatenated with the class token, Linear, GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        tokens = x[:, 1:]
        return self.project(torch.cat([tokens, x[:, :1].expand_as(tokens)], dim=-1))


def _reassemble(cfg: MidasConfig, width: int, downsample: bool) -> nn.Sequential:
    # Indices as in the original file: 0 readout, (1 transpose, 2 unflatten: no weights), 3 1x1 conv, 4 the
    # stride-2 3x3 conv of the last map.
    layers = [_ProjectReadout(cfg.hidden_size), nn.Identity(), nn.Identity(), nn.Conv2d(cfg.hidden_size, width, 1)]
    if downsample:
        layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class _Pretrained(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.model = _ViTHybrid(cfg)
        self.act_postprocess3 = _reassemble(cfg, cfg.neck_widths[0], downsample=False)
        self.act_postprocess4 = _reassemble(cfg, cfg.neck_widths[1], downsample=True)


class _ResidualConvUnit(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined skip map, refine, upsample (bilinear, corners aligned), 1x1."""

    def __init__(self, width: int):
        super().__init__()
        self.resConfUnit1 = _ResidualConvUnit(width)  # the original checkpoint's names
        self.resConfUnit2 = _ResidualConvUnit(width)
        self.out_conv = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int] | None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.out_conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class _Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _Scratch(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        f = cfg.fusion_width
        ins = (*cfg.stage_widths[:2], *cfg.neck_widths)
        for i, cin in enumerate(ins, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(cin, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", _FusionBlock(f))
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            _Upsample2x(),
            nn.Conv2d(f // 2, cfg.head_width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cfg.head_width, 1, 1),
            nn.ReLU(),  # non-negative output
        )


class DPTHybrid(nn.Module):
    """MiDaS DPT-Hybrid: ``forward(x)`` maps normalised images (B, 3, H, W), H and W multiples of 32, to
    relative inverse depth (B, H, W)."""

    def __init__(self, cfg: MidasConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or MidasConfig()
        if len(cfg.stage_widths) != 3 or len(cfg.stage_depths) != 3:
            raise ValueError(f"DPT-Hybrid has 3 ResNet stages; the config gives {cfg.stage_depths}")
        self.pretrained = _Pretrained(cfg)
        self.scratch = _Scratch(cfg)

    def features(self, x: Tensor) -> list[Tensor]:
        """The four feature maps at strides 4, 8, 16 and 32 of the input."""
        vit = self.pretrained.model
        h, w = x.shape[-2:]
        gh, gw = h // 16, w // 16
        stages = vit.patch_embed.backbone(x)
        tokens = vit.patch_embed.proj(stages[-1]).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + vit._pos_embed(gh, gw).to(tokens.dtype)
        taps = {}
        last = max(self.config.hooks)
        for i, block in enumerate(vit.blocks[: last + 1]):
            tokens = block(tokens)
            if i in self.config.hooks:
                taps[i] = tokens
        maps = [stages[0], stages[1]]
        for hook, post in zip(self.config.hooks, (self.pretrained.act_postprocess3, self.pretrained.act_postprocess4)):
            t = post[0](taps[hook]).transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
            for layer in list(post)[3:]:
                t = layer(t)
            maps.append(t)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(
                f"DPT-Hybrid input is {x.shape[-2]} x {x.shape[-1]}; both sides must be multiples of 32 "
                "(estimate_depth resizes images so)"
            )
        s = self.scratch
        l1, l2, l3, l4 = (
            conv(m) for conv, m in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn), self.features(x))
        )
        p = s.refinenet4(l4, None, l3.shape[-2:])
        p = s.refinenet3(p, l3, l2.shape[-2:])
        p = s.refinenet2(p, l2, l1.shape[-2:])
        p = s.refinenet1(p, l1, None)
        return s.output_conv(p).squeeze(1)


def midas_input_size(height: int, width: int, target: int = 384, multiple: int = 32) -> tuple[int, int]:
    """The network input size for an image, as MiDaS' ``Resize(384, 384, keep_aspect_ratio=True,
    ensure_multiple_of=32, resize_method="minimal")``: scale by whichever of 384/h, 384/w is nearer 1
    (keeping the aspect ratio), then round each side to the nearest multiple of 32 (halves to even, as
    numpy's round), at least one multiple."""
    sh, sw = target / height, target / width
    scale = sw if abs(1 - sw) < abs(1 - sh) else sh
    return tuple(max(multiple, round(scale * n / multiple) * multiple) for n in (height, width))  # type: ignore[return-value]


def estimate_depth(model: DPTHybrid, images: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
    """Relative inverse depth of ``images`` (B, 3, H, W) in [0, 1], as SD2's depth-to-image computes it.

    Preprocessing as the original MiDaS transform that SD2 depth uses: resize (bicubic, a = -0.75 as
    cv2.INTER_CUBIC, no antialiasing) to ``midas_input_size`` (or ``size``), normalise with mean 0.5 and
    std 0.5 (to [-1, 1]); then DPT-Hybrid; returns (B, 1, h, w) at the network's input size, upsampled
    bicubically from its output like ``MiDaSInference.forward``. Larger values are nearer; the scale and
    shift are unknown (relative, affine-invariant inverse depth).

    SD2 depth2img then resizes this map bicubically (align_corners=False) to the latent size (H/8, W/8)
    and min-max normalises each image to [-1, 1] (``sd2_depth_condition``).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"estimate_depth expects images (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
    p = next(model.parameters())
    h, w = size or midas_input_size(images.shape[-2], images.shape[-1])
    x = images.to(device=p.device, dtype=torch.float32)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        depth = model(x.to(p.dtype)).float().unsqueeze(1)
    if depth.shape[-2:] != (h, w):
        depth = F.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False)
    return depth


def sd2_depth_condition(depth: Tensor, latent_size: tuple[int, int], *, eps: float = 0.0) -> Tensor:
    """The depth channel SD2's depth UNet takes: ``depth`` (B, 1, h, w) resized bicubically
    (align_corners=False) to the latent size, then per image ``2 * (d - min) / (max - min + eps) - 1``.

    ``eps = 0`` as A1111 (``depth2img_image_conditioning``: one image's depth for the whole batch) and
    diffusers (``prepare_depth_map``, which resizes the raw 384-px network output); the original
    training code (``LatentDepth2ImageDiffusion.get_input``) adds ``eps = 1e-3``. A constant map gives -1.
    """
    d = F.interpolate(depth.float(), size=latent_size, mode="bicubic", align_corners=False)
    lo = torch.amin(d, dim=(1, 2, 3), keepdim=True)
    hi = torch.amax(d, dim=(1, 2, 3), keepdim=True)
    return 2.0 * (d - lo) / (hi - lo + eps).clamp_min(torch.finfo(torch.float32).tiny) - 1.0
