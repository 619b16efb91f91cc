"""Normalisation and embeddings shared by the networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import native


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype, as the original UNet computes it.

    PyTorch's bfloat16 kernel already accumulates in float32 and gives the same output as upcasting
    (tested), 1.5x faster on large activations, so bf16 runs natively. So does float16 on CUDA, whose
    kernel also computes in float32 (as diffusers runs it); upcasting there cost two extra passes over
    every activation (benchmarks/profile_step.py --group-norm). Float16 elsewhere is upcast explicitly.
    """

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        """GroupNorm of ``x``, then SiLU when ``silu`` (the ResBlocks' norm-activation pair): bf16
        channels-last activations on AVX512-BF16 CPUs take the fused kernel (``nn.native``)."""
        if native.groupnorm_usable(x, self.num_groups):
            return native.group_norm_bf16(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)
        if x.dtype in (torch.float32, torch.bfloat16) or x.is_cuda:
            out = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            out = F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        if not silu:
            return out
        # ``out`` is this call's own tensor: without autograd the SiLU overwrites it rather than taking
        # a second activation-sized block (in fp32 the VAE's are 128-256 MB: fresh, page-faulted mappings)
        return F.silu(out, inplace=not (torch.is_grad_enabled() and out.requires_grad))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first then sin half.

    t: (N,) -> (N, dim). Frequencies exp(-ln(max_period) * i / half), i = 0..half-1 (DDPM/LDM
    convention with "flip_sin_to_cos" and no frequency shift). Computed in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
