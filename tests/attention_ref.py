"""References the kernel tests share (tests/test_native_kernels.py, test_native_avx2.py, test_fused.py):
attention's formula in float64, softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), PyTorch's SDPA
on the same (B, N, C) layout, and GEGLU's definition in float64, value * gelu(gate) with the erf GELU
(Hendrycks & Gimpel 2016)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def exact(q, k, v, heads):
    """The attention formula in float64 on the same inputs, (B, N, C) layout."""
    b, nq, c = q.shape
    d = c // heads
    qq, kk, vv = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vv).transpose(1, 2).reshape(b, nq, c)


def sdpa(q, k, v, heads):
    """PyTorch's SDPA on (B, N, C) inputs."""
    b, nq, c = q.shape
    d = c // heads
    qq, kk, vv = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qq, kk, vv).transpose(1, 2).reshape(b, nq, c)


def geglu_exact(x, weight, bias):
    """GEGLU of x under the projection (weight, bias) in float64."""
    h = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    value, gate = h.chunk(2, dim=-1)
    return value * (gate * 0.5 * (1 + torch.special.erf(gate / math.sqrt(2))))


def geglu_plain(x, weight, bias):
    """GEGLU in PyTorch's plain ops, in the inputs' dtype."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)
