"""Seeded noise: the same seed gives the same latent on every device.

A1111's semantics: image i of a batch has its own generator seeded with seed + i (on the CPU by
default); the starting noise and every later draw of an ancestral/SDE sampler come from it in order.
SDE samplers that A1111/ComfyUI drive with a Brownian tree (torchsde) get one tree per image seeded
with the image's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ImageNoise:
    """Per-image generators; ``next()`` draws one noise tensor for the whole batch (B, C, H, W)."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        *,
        device: str | torch.device = "cpu",
        out_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.shape = tuple(shape)  # one image's latent, (C, H, W)
        self.device = torch.device(device)
        self.out_device = torch.device(out_device)
        self.dtype = dtype
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def next(self) -> Tensor:
        draws = [torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=self.out_device, dtype=self.dtype)

    def __call__(self, sigma=None, sigma_next=None) -> Tensor:
        return self.next()


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(float(value), dtype=torch.float32)


class BrownianNoise:
    """Noise from per-image Brownian trees (torchsde), as k-diffusion's BrownianTreeNoiseSampler:
    the increment W(sigma_next) - W(sigma) divided by sqrt(|sigma_next - sigma|).

    Brownian paths are rough: moving a query time by 1e-7 changes the increment by ~sqrt(1e-7). Times
    are therefore rounded to float32, the precision A1111, ComfyUI and diffusers query the tree with."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        sigma_min: float,
        sigma_max: float,
        *,
        out_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        import torchsde

        self.out_device, self.dtype = torch.device(out_device), dtype
        t0, t1 = _f32(sigma_min), _f32(sigma_max)
        w0 = torch.zeros(shape)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma, sigma_next) -> Tensor:
        a, b = _f32(sigma), _f32(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (b - a).abs().sqrt()).to(device=self.out_device, dtype=self.dtype)
