"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016; issue 16).

On CPUs with AVX512-BF16 and no AMX, oneDNN already runs the UNet's 3x3 convolutions near the bf16
matmul peak, and they are nearly half of a step; only fewer multiplications make them faster. F(2x2,
3x3) turns each 4x4 input tile into 16 values (additions only), multiplies them channel by channel with
the 16 values of the transformed 3x3 filter, U = G g G^T, and turns the 16 sums back into a 2x2 output
block: 16 products per output pair where the direct convolution has 36, 2.25x fewer. The products run in
latentforge's kernel (``kernels/winograd_bf16.cpp``, through ``nn.native``), 1.4-1.9x faster than oneDNN on
SD's shapes (``benchmarks/bench_winograd.py``).

Numerics: the transformed tiles and filters are rounded to bf16 (they are sums of bf16 values), so the
result is not the direct convolution's to the last bit: measured relative RMS error 4.2e-3 against float64
where oneDNN's bf16 convolution has 1.7e-3 (``tests/test_winograd.py``), and on whole images the PSNR
against the fp32 image is reported by ``benchmarks/bench_winograd.py`` (issue 16's bar: 40 dB).

Memory: U is 16/9 of the filter, and the plain filter stays (the packed session cannot give back a
plain weight from U bit for bit), so Winograd is used where the activations are large next to the
filters: feature maps of at least ``MIN_PIXELS`` pixels (SD1.5 at 512 px: the 64x64 and 32x32 levels,
280 MB of transformed filters). A session that runs its module many times (``packed_session(repeated=
True)``: the UNet during sampling) also runs maps of ``MIN_PIXELS_REPEATED`` pixels by Winograd (SD1.5's
16x16 level, 680 MB more). Filters made in a session are dropped when it ends, or when the VAE, the
other memory peak of a generation, starts (``nn.packed.shed``): made again per generation (SD1.5's UNet
1 s, the VAE 0.2 s) rather than held through the peaks.
``LATENTFORGE_WINOGRAD``: ``auto`` (default: where the bf16 kernels run, ``nn.native.ready``, and the map
is that large), ``off`` (oneDNN's direct convolution), ``on`` (every map size).
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge import allocator
from latentforge.nn import native

MIN_PIXELS = 1024
# in a session that runs the module many times (a sampler's steps: ``packed_session(repeated=True)``),
# maps down to this size too (SD1.5's 16x16 level at 512 px: 680 MB of transformed filters, 0.7 s to
# make per generation, 0.15-0.3 s saved per step)
MIN_PIXELS_REPEATED = 256
# the most memory the transformed input of one convolution takes (larger inputs go in bands of rows)
BAND_BYTES = 64 << 20
# F(2x2, 3x3)'s filter transform
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def mode() -> str:
    value = os.environ.get("LATENTFORGE_WINOGRAD", "auto").strip().lower() or "auto"
    if value not in ("auto", "off", "on"):
        raise ValueError(f"LATENTFORGE_WINOGRAD={value!r}: use auto, off or on")
    return value


def usable(conv: nn.Conv2d, x: Tensor, repeated: bool = False) -> bool:
    """Whether ``conv(x)`` may run by Winograd: a plain 3x3 convolution (stride 1, padding 1, no dilation
    or groups; zero or circular padding) of a bf16 channels-last CPU input without autograd, an even number of input
    channels and a multiple of 32 output channels, a large enough map (``MIN_PIXELS``, or
    ``MIN_PIXELS_REPEATED`` when the caller runs it ``repeated``ly; any size with
    ``LATENTFORGE_WINOGRAD=on``) and the bf16 kernels available."""
    w = conv.weight
    m = mode()
    return (
        m != "off"
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode in ("zeros", "circular")
        and x.dim() == 4
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and (conv.bias is None or conv.bias.device.type == "cpu")
        and conv.in_channels % 2 == 0
        and conv.out_channels % 32 == 0
        and x.numel() > 0
        and (m == "on" or x.shape[2] * x.shape[3] >= (MIN_PIXELS_REPEATED if repeated else MIN_PIXELS))
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and native.ready()
    )


def transform(weight: Tensor) -> Tensor:
    """U = G g G^T of the (Cout, C, 3, 3) filters, in float64, rounded once to bf16 and packed for the
    kernel as (Cout/32, 16, C/2, 32, 2): for each block of 32 output channels and each of the 16 tile
    positions, pairs of input channels per output-channel lane."""
    w = weight.detach()
    if w.dtype == torch.bfloat16 and w.device.type == "cpu" and native.ready():
        return native.winograd_filters(w)  # the same numbers, 30x faster (a second per SD1.5 generation)
    cout, c = w.shape[:2]
    u = (G @ w.to("cpu", torch.float64) @ G.T).to(torch.bfloat16)  # (Cout, C, 4, 4)
    u = u.view(cout // 32, 32, c // 2, 2, 4, 4).permute(0, 4, 5, 2, 1, 3)
    return u.reshape(cout // 32, 16, c // 2, 32, 2).contiguous()  # reshape alone may give a strided view


def conv3x3(x: Tensor, u: Tensor, bias: Tensor | None, out_channels: int, wraps: bool = False) -> Tensor:
    """The convolution of ``x`` with the filters whose transform is ``u`` (``transform``) plus ``bias``:
    (N, out_channels, H, W) bf16 channels-last. Call where ``usable`` said yes. ``wraps``: circular padding
    (tiling, ``nn/circular.py``) instead of zeros: the kernel pads with zeros, so it convolves the input
    padded circularly by one pixel and the result is the inside of its output (the border pixels, computed
    from the zeros beyond, are dropped; (H + 2)(W + 2) / HW of the work)."""
    c = x.shape[1]
    if u.dtype != torch.bfloat16 or not u.is_contiguous() or u.shape != (out_channels // 32, 16, c // 2, 32, 2):
        raise ValueError(
            f"filters of shape {tuple(u.shape)} are not the transform of {c} -> {out_channels} 3x3 filters"
        )
    if wraps:
        padded = F.pad(x, (1, 1, 1, 1), mode="circular")
        out = conv3x3(padded, u, bias, out_channels)
        return out[..., 1:-1, 1:-1].contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    n, _, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    group = native.WINOGRAD_GROUP
    # V holds 16 bf16 values per tile and input channel: in bands of tile rows of at most BAND_BYTES
    per_row = n * tw * 16 * c * 2
    band = max(1, min(th, BAND_BYTES // per_row))
    buf = _workspace((-(-n * band * tw // group)) * group * 16 * c)
    b = bias.detach().float().contiguous() if bias is not None else None
    out = torch.empty(n, out_channels, h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
    for ty0 in range(0, th, band):
        rows = (ty0, min(th, ty0 + band))
        v = native.winograd_input(x, rows, buf)
        native.winograd_conv(v, u, b, out, c, rows)
    return out


# One buffer per thread for the transformed input (V, 4x the input): allocated afresh, tens of MB would be
# mapped and page-faulted on every call (glibc maps blocks over 32 MB). Grows to the largest V seen, in its
# own mapping (``allocator.mapped_empty``: in the VAE's heap mode a buffer on the heap splits it);
# ``release`` frees them all (the packed session does on exit).
_BUFFERS: dict[int, Tensor] = {}
_BUFFERS_LOCK = threading.Lock()


def _workspace(numel: int) -> Tensor:
    key = threading.get_ident()
    with _BUFFERS_LOCK:
        buf = _BUFFERS.get(key)
        if buf is None or buf.numel() < numel:
            _BUFFERS[key] = None  # the old one freed before the larger one is mapped
            _BUFFERS[key] = buf = allocator.mapped_empty((numel,), torch.bfloat16)
    return buf


def release() -> None:
    """Free the transformed-input buffers of every thread."""
    with _BUFFERS_LOCK:
        _BUFFERS.clear()
