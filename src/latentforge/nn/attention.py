"""The one attention path of latentforge: multi-head scaled dot-product attention, through PyTorch's SDPA
or latentforge's own kernels: for bf16 on CPUs with AVX512-BF16 and no AMX (``nn.native``), for fp32 on CPUs
with AVX2 and no AVX-512 (``nn.native_avx2``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import native, native_avx2


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, *, causal: bool = False, upcast: bool = False) -> Tensor:
    """Multi-head attention (Vaswani et al. 2017) with scale head_dim^-0.5.

    q: (B, Nq, C), k and v: (B, Nk, C) with C = heads * head_dim. Returns (B, Nq, C).
    ``upcast`` computes in float32 when the inputs are half precision (the SD2 768-v models need it).
    """
    b, nq, c = q.shape
    d = c // heads
    dtype = q.dtype
    # Channels must be the innermost dimension: with another stride (e.g. tokens taken from NCHW
    # activations, C stride = HW) SDPA's CPU flash kernel falls back to the math path, which stores all
    # N x N scores (17 GB for the VAE at 2048 px). Already so for linear outputs and channels-last maps.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if not causal and not upcast and native.attention_usable(q, k, v, heads):
        return native.attention_bf16(q, k, v, heads)
    if not causal and native_avx2.attention_usable(q, k, v, heads):
        return native_avx2.attention_fp32(q, k, v, heads)  # fp32 on AVX2 CPUs (upcast: no-op in fp32)
    # (B, N, C) -> (B, heads, N, d)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, nq, c).to(dtype)


class CrossAttention(nn.Module):
    """Attention of the UNet's transformer blocks, named as in the original checkpoints.

    q/k/v projections have no bias; ``to_out.0`` has one. With ``context_dim`` set, keys and values come
    from the context (cross-attention), otherwise from ``x`` (self-attention).

    ``context_hook``, the declared seam for hypernetworks: when set (by the pipeline's patcher, never
    by hand), ``context_hook(context) -> (context for keys, context for values)`` transforms what the
    key and value projections see; ``context`` is ``x`` itself for self-attention.
    """

    context_hook: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        k_ctx = v_ctx = ctx
        if self.context_hook is not None:
            k_ctx, v_ctx = self.context_hook(ctx)
        out = attention(self.to_q(x), self.to_k(k_ctx), self.to_v(v_ctx), self.heads, upcast=self.upcast)
        return self.to_out(out)
