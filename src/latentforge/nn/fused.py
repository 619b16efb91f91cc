"""Elementwise work fused into oneDNN's matmuls as post-ops (issue 16, "memory-bound work fused").

GEGLU (Shazeer 2020), ``value * gelu(gate)`` with ``[value, gate] = x W^T + b``, is the UNet's widest
projection (320 -> 2 x 1280 over 4096 tokens at SD1.5's first level). Done plainly, the (tokens, 2F)
product is written to memory, read back for the bias, the GELU and the product, and written again.
``linear_geglu`` instead runs two matmuls through PyTorch's oneDNN linear op
(``torch.ops.mkldnn._linear_pointwise``, what inductor emits): ``gate = gelu(x W_g^T + b_g)`` with the
exact (erf) GELU as the matmul's post-op, then ``x W_v^T + b_v`` with a binary ``mul`` post-op by
``gate``. The (tokens, 2F) intermediate never exists, and the bias and GELU are applied to the fp32
accumulator before any rounding to bf16 (measured: 1.37x faster at the first level's shape, and closer
to the float64 result than the plain bf16 ops; ``tests/test_fused.py``).

Used for bf16 on CPUs where oneDNN has bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), without
autograd; ``LATENTFORGE_KERNELS=off`` keeps PyTorch's plain ops as for ``nn.native``'s kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from latentforge.nn import native


@functools.cache
def available() -> bool:
    """True where PyTorch's oneDNN linear op runs bf16 natively (checked once)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_is_mkldnn_bf16_supported")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def geglu_shapes_ok(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """What every fused GEGLU asks: ``x`` (.., C) and ``weight`` (2F, C) (and ``bias`` (2F)) of ``dtype`` on
    the CPU, not empty, no autograd, the kernels not turned off."""
    return (
        x.dtype == dtype
        and weight.dtype == dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % 2 == 0
        and x.dim() >= 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and (bias is None or (bias.dtype == dtype and bias.device.type == "cpu" and bias.dim() == 1))
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
        and native.mode() != "off"
    )


def linear_geglu_usable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``linear_geglu`` takes this input and projection: bf16 on the CPU, no autograd."""
    return geglu_shapes_ok(x, weight, bias, torch.bfloat16) and available()


def linear_geglu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GEGLU of ``x`` under the projection ``weight`` (2F, C) and ``bias`` (2F): the first F outputs are
    the value, the last F the gate (as ``chunk(2, -1)`` splits them). Call where ``linear_geglu_usable``
    said yes."""
    f = weight.shape[0] // 2
    w = weight.contiguous()
    b_value = b_gate = None
    if bias is not None:
        b_value, b_gate = bias[:f].contiguous(), bias[f:].contiguous()
    ops = torch.ops.mkldnn
    gate = ops._linear_pointwise(x, w[f:], b_gate, "gelu", [], "none")  # "none": the exact (erf) GELU
    return ops._linear_pointwise.binary(x, gate, w[:f], b_value, "mul")
