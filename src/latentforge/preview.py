"""Cheap progress previews: a linear map from latent channels to RGB, fitted once per model.

The map is fitted by least squares on the model's own VAE encoding of smooth synthetic colour fields,
so it suits any VAE (SD, SDXL, the demo model) without stored coefficients. A preview costs one
matrix product per pixel of the latent, no VAE decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


@torch.inference_mode()
def fit_latent_to_rgb(vae, size: int = 64, count: int = 12) -> Tensor:
    """(C + 1, 3) weights mapping a scaled latent (plus a bias) to RGB in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(count, 3, 3, 3, generator=g) * 2 - 1
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).float().cpu()
    down = size // latents.shape[-1]
    rgb = F.avg_pool2d(images, down)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x.double(), y.double()).solution.float()


def latent_preview(pipe, latents: Tensor) -> list[Image.Image]:
    weights = pipe.cached("preview weights", lambda: fit_latent_to_rgb(pipe.vae))
    x = latents.detach().float().cpu().permute(0, 2, 3, 1)
    rgb = x @ weights[:-1] + weights[-1]
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]
