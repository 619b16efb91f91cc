"""latentforge's own fp32 kernels for CPUs with AVX2 and FMA (issue 16, "on an AVX2-only CPU").

Where the CPU has no native bf16 (``device.auto_dtype`` picks fp32 there: AMD Zen 2/3, Intel before Cooper
Lake), generation runs in fp32 and the bf16 kernels of ``nn.native`` do not apply. Two parts of a UNet step
then leave the FMA units idle (``benchmarks/profile_unet.py --dtype fp32``):

- attention: PyTorch's flash-attention kernel computes its block products by general GEMM calls whose
  40-long reductions (SD1.5's first level, a fifth of the step) run well below the matmul peak;
  ``kernels/attention_avx2.cpp`` computes the same online-softmax attention with register tiles written
  for these shapes, K packed once per head;
- the transforms of the fp32 Winograd convolution (``nn/winograd.py``): in PyTorch ops each took several
  passes over memory (padding, rows, columns, bias); ``kernels/winograd_avx2.cpp`` does each in one;
- GEGLU's elementwise half: PyTorch's plain ops copy the bias into the (tokens, 2F) product before the
  GEMM, then run the GELU and the product as passes of their own; here the product is made without its
  bias (MKL) and ``kernels/geglu_avx2.cpp`` adds the bias and applies the exact GELU and the product in
  one pass.

All are built by ``nn.native`` (the ``avx2`` library: ``kernels/*_avx2.cpp``, compiled with ``-mavx2
-mfma`` on first use, cached like the bf16 one) and run on PyTorch's OpenMP threads. ``LATENTFORGE_KERNELS``
governs them as it does the bf16 kernels: ``auto`` and ``on`` use them on CPUs with AVX2 and FMA, ``off``
keeps PyTorch's ops. Where the build fails they are not used (one warning says why).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from latentforge.nn import fused, native

AVX2 = native.Library("avx2", ("-mavx2", "-mfma"))
# below this many scores (batch x heads x queries x keys) SDPA's lower call overhead wins
MIN_SCORES = native.MIN_SCORES


# GEGLU products of fewer elements (tokens x 2F) keep PyTorch's ops: the tiny models (the demo's, the
# tests') never build the library for it
MIN_GEGLU_ELEMENTS = 1 << 20
# wider heads stay with SDPA (the VAE's single 512-wide head: 216 against 200 ms at 512 px)
MAX_HEAD_WIDTH = 160


def wanted() -> bool:
    """Whether this CPU and ``LATENTFORGE_KERNELS`` call for the fp32 kernels (before building them):
    ``auto`` on CPUs with AVX2 and FMA but not AVX-512 (where they were measured; PyTorch's ops there use
    512-bit code), ``on`` on any CPU with AVX2 and FMA."""
    m, flags = native.mode(), native.cpu_flags()
    if m == "off" or "avx2" not in flags or "fma" not in flags:
        return False
    return m == "on" or "avx512f" not in flags


def _declare(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lf_attention_fp32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_float, ctypes.c_int]
    lib.lf_geglu_fp32.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int]
    )
    lib.lf_wino_input_fp32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    lib.lf_groupnorm_affine_fp32.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    )
    lib.lf_wino_output_fp32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    kernels = (
        "lf_attention_fp32", "lf_geglu_fp32", "lf_wino_input_fp32", "lf_wino_output_fp32", "lf_groupnorm_affine_fp32"
    )  # fmt: skip
    for fn in [getattr(lib, name) for name in kernels] + [lib.lf_parallel_runtime]:
        fn.restype = ctypes.c_int
    return lib


def _library():
    return native.load_library(AVX2, _declare)


def ready() -> bool:
    """The fp32 kernels are wanted here and built, and the caller is not being traced by ``torch.compile``
    (a ctypes call on tensors' addresses cannot be traced: the compiled graph gets PyTorch's ops)."""
    return not torch.compiler.is_compiling() and wanted() and _library() is not None


def attention_usable(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether ``attention_fp32`` takes these (B, N, C) inputs: fp32 CPU tensors, channels innermost, a head
    width that is a multiple of 8 up to ``MAX_HEAD_WIDTH``, no autograd, a problem big enough to pay off, the
    kernels wanted here."""
    return native.attention_shapes_ok(q, k, v, heads, torch.float32, 8, MAX_HEAD_WIDTH, MIN_SCORES) and ready()


def attention_fp32(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head for (B, N, C) fp32 inputs (C = heads * d); (B, Nq, C) out.
    Call only where ``attention_usable`` said yes."""
    return native.call_attention(_library().lf_attention_fp32, q, k, v, heads)


def geglu_usable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``linear_geglu_fp32`` takes this input and projection: fp32 on the CPU, no autograd, a
    product of at least ``MIN_GEGLU_ELEMENTS``."""
    return (
        fused.geglu_shapes_ok(x, weight, bias, torch.float32)
        and x.numel() // x.shape[-1] * weight.shape[0] >= MIN_GEGLU_ELEMENTS
        and ready()
    )


def linear_geglu_fp32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GEGLU of ``x`` under the projection ``weight`` (2F, C) and ``bias`` (2F): value * gelu(gate) with the
    first F outputs the value and the last F the gate (as ``chunk(2, -1)`` splits them). Call where
    ``geglu_usable`` said yes."""
    f = weight.shape[0] // 2
    x2 = x.reshape(-1, x.shape[-1])
    h = torch.mm(x2, weight.t())  # no bias: the kernel adds it
    out = torch.empty(x2.shape[0], f, dtype=torch.float32)
    bias = bias.contiguous() if bias is not None else None
    rc = _library().lf_geglu_fp32(
        h.data_ptr(), h.stride(0), bias.data_ptr() if bias is not None else None, out.data_ptr(), f,
        x2.shape[0], f, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"GEGLU kernel refused a ({x2.shape[0]}, {2 * f}) product")
    return out.view(*x.shape[:-1], f)


def winograd_usable(x: Tensor, out_channels: int) -> bool:
    """Whether ``winograd_input`` / ``winograd_output`` take this fp32 channels-last input (``nn.winograd``
    has already checked the convolution): channel counts that are multiples of 8, the kernels here."""
    return (
        x.dtype == torch.float32
        and x.shape[1] % 8 == 0
        and out_channels % 8 == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and ready()
    )


def winograd_input(x: Tensor, rows: tuple[int, int], v: Tensor, prologue: tuple[Tensor, Tensor] | None = None) -> None:
    """V = B^T d B of the zero-padded channels-last fp32 ``x`` (N, C, H, W) for the tile rows ``rows`` =
    [ty0, ty1), written into ``v`` (16, tiles, C) contiguous (``kernels/winograd_avx2.cpp``). ``prologue``:
    (scale, shift), each (N, C) fp32 contiguous: the transform is of silu(x scale + shift) instead (a
    GroupNorm and its SiLU, ``group_norm_affine``), the normalised map never written out."""
    n, c, h, w = x.shape
    scale, shift = (p.data_ptr() for p in prologue) if prologue is not None else (None, None)
    rc = _library().lf_wino_input_fp32(
        x.data_ptr(), n, h, w, c, *rows, v.data_ptr(), scale, shift, torch.get_num_threads()
    )
    if rc != 0:
        raise RuntimeError(f"Winograd input transform refused shape {tuple(x.shape)}, tile rows {rows}")


def winograd_output(m: Tensor, bias: Tensor | None, out: Tensor, rows: tuple[int, int]) -> None:
    """A^T M A of the products ``m`` (16, tiles, Cout) for the tile rows ``rows``, plus ``bias``, written into
    ``out`` (N, H, W, Cout) contiguous."""
    n, h, w, k = out.shape
    bias = bias.detach().contiguous() if bias is not None else None
    rc = _library().lf_wino_output_fp32(
        m.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(), n, h, w, k, *rows,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"Winograd output transform refused {tuple(out.shape)}, tile rows {rows}")


def group_norm_affine(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """GroupNorm of channels-last fp32 ``x`` (N, C, H, W) as a per-image, per-channel affine map: (scale,
    shift), each (N, C), with GroupNorm(x) = x scale + shift; statistics in double."""
    n, c, h, w = x.shape
    scale, shift = torch.empty(n, c), torch.empty(n, c)
    weight = weight.detach().float().contiguous() if weight is not None else None
    bias = bias.detach().float().contiguous() if bias is not None else None
    rc = _library().lf_groupnorm_affine_fp32(
        x.data_ptr(), n, h * w, c, groups, eps, weight.data_ptr() if weight is not None else None,
        bias.data_ptr() if bias is not None else None, scale.data_ptr(), shift.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"GroupNorm statistics refused shape {tuple(x.shape)} with {groups} groups")
    return scale, shift
