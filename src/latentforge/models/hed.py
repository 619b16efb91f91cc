"""HED soft edges: holistically-nested edge detection (Xie & Tu, ICCV 2015, "Holistically-Nested Edge
Detection").

The network is VGG16's five convolution stages (3x3 convolutions with ReLU; 2x2 max pooling between
stages), a 1x1 "side output" convolution to one channel after each stage, each side output upsampled
bilinearly (half-pixel centres) to the input size, and a fusion of the five: a learned 1x1 convolution
(the original HED, ``fuse``) or their mean (lllyasviel's ``ControlNetHED_Apache2``, the network of the
A1111 ControlNet extension's ``softedge_hed``). The edge probability is the sigmoid of the fused map.

Module names are the ``ControlNetHED.pth`` ones (``norm``, ``block{1..5}.convs.{i}``,
``block{1..5}.projection``) plus ``fuse``; the input is RGB in 0..255 and ``norm`` (1, 3, 1, 1) is
subtracted from it (learned in ControlNetHED; the Caffe BGR mean for the original HED, whose first
convolution is stored with its input channels in RGB order). Files are read by ``models/hed_load.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (channels, convolutions) of VGG16's five stages
STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# The BSDS500 HED's input mean (Caffe, BGR order), subtracted from 0..255 pixels
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


@dataclass(frozen=True)
class HEDConfig:
    """``learned_fuse``: a 1x1 convolution fuses the side outputs (original HED) instead of their mean
    (ControlNetHED). ``ceil_pool``: max pooling keeps the last row/column of odd sizes (Caffe's rounding
    and Keras ``padding="same"``) instead of dropping it (PyTorch's default, as ControlNetHED runs)."""

    learned_fuse: bool = False
    ceil_pool: bool = False


class HEDStage(nn.Module):
    """One VGG16 stage (3x3 convolutions, each followed by ReLU) and its 1x1 side-output projection."""

    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers))
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    """HED on RGB images in 0..255, (B, 3, H, W) -> fused edge logits (B, 1, H, W)."""

    def __init__(self, config: HEDConfig | None = None):
        super().__init__()
        self.config = config or HEDConfig()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (cout, layers) in enumerate(STAGES):
            setattr(self, f"block{i + 1}", HEDStage(cin, cout, layers))
            cin = cout
        self.fuse = nn.Conv2d(len(STAGES), 1, 1) if self.config.learned_fuse else None

    def side_outputs(self, x: Tensor) -> list[Tensor]:
        """The five side-output logits, each at its stage's resolution."""
        h = x - self.norm
        out = []
        for i in range(len(STAGES)):
            if i:
                h = F.max_pool2d(h, 2, 2, ceil_mode=self.config.ceil_pool)
            h, side = getattr(self, f"block{i + 1}")(h)
            out.append(side)
        return out

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        sides = [
            s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            for s in self.side_outputs(x)
        ]
        stacked = torch.cat(sides, dim=1)
        if self.fuse is not None:
            return self.fuse(stacked)
        return stacked.mean(dim=1, keepdim=True)

    def edges(self, x: Tensor) -> Tensor:
        """Edge probabilities in [0, 1], (B, 1, H, W)."""
        return torch.sigmoid(self(x))


__all__ = ["CAFFE_MEAN_BGR", "HED", "STAGES", "HEDConfig", "HEDStage"]
