"""Nearest 2x upsampling followed by a 3x3 convolution, computed without the upsampled map (issue 16).

The UNet's and the VAE decoder's ``Upsample`` blocks double a map by repeating each pixel and then run a
3x3 convolution (padding 1) over the doubled map. Every output pixel of phase ``(a, b)`` (its row and
column parity) sees only 2x2 distinct input pixels under its 3x3 window, because the window's rows
``2i + a - 1 .. 2i + a + 1`` of the doubled map are the input rows ``i - 1, i, i`` (a = 0) or ``i, i, i + 1``
(a = 1), and the same for columns. So the four phases are four 2x2 convolutions of the *input* with
kernels made by summing the 3x3 kernel's taps: rows ``[w0, w1 + w2]`` (a = 0) or ``[w0 + w1, w2]`` (a = 1),
likewise for columns. That is 16 products per 2x2 output block and channel pair where the plain way has
36 (2.25x fewer), and the doubled input is never written. The result is the same convolution up to the
order of the additions (the summed taps are exact in float64 and rounded once).

Used where it was measured (``docs/performance.md``, "On an AVX2-only CPU"): fp32 on the CPU, without
autograd, input maps of at least ``MIN_PIXELS`` pixels, a plain zero-padded 3x3 convolution with no hooks
(adapters and offloading keep the plain path), an exact doubling, and not under
``LATENTFORGE_KERNELS=off``. Elsewhere (bf16, where the same convolutions already run by Winograd's 2.25x
fewer products; CUDA) the plain path runs.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import native, packed

# input maps below this many pixels keep the plain path (four small convolutions cost more calls than
# they save products: SD1.5's 8x8 and 16x16 levels)
MIN_PIXELS = 1024
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conv -> (weight key, (4, Cout, C, 2, 2))
_LOCK = threading.Lock()


def upsample_conv(x: Tensor, conv: nn.Conv2d, size: tuple[int, int] | None = None) -> Tensor:
    """``conv(F.interpolate(x, size or 2x, mode="nearest"))``."""
    doubled = (2 * x.shape[-2], 2 * x.shape[-1])
    if size is not None and tuple(size) != doubled:
        return conv(F.interpolate(x, size=size, mode="nearest"))
    if not usable(x, conv):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    kernels = _phase_kernels(conv)
    n, _, h, w = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if cl else torch.contiguous_format
    out = torch.empty(n, conv.out_channels, 2 * h, 2 * w, dtype=x.dtype, memory_format=layout)
    xp = F.pad(x, (1, 1, 1, 1))
    if cl:
        xp = xp.contiguous(memory_format=torch.channels_last)
    for a in (0, 1):
        for b in (0, 1):
            part = xp[:, :, a : a + h + 1, b : b + w + 1]
            out[:, :, a::2, b::2] = F.conv2d(part, kernels[2 * a + b], conv.bias)
    return out


def usable(x: Tensor, conv: nn.Conv2d) -> bool:
    w = conv.weight
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and x.shape[-2] * x.shape[-1] >= MIN_PIXELS
        and x.numel() > 0
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and (conv.bias is None or conv.bias.dtype == torch.float32)
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and native.mode() != "off"
    )


def _phase_kernels(conv: nn.Conv2d) -> Tensor:
    """The four 2x2 kernels (phase 2a + b), made from the plain weight once per weight version."""
    w = conv.weight
    if w.numel() == 0:  # swapped out by a packed session that ran this layer plainly: the plain one back
        packed.materialize(w)
        w = conv.weight
    if w.is_inference():  # no version counter to tell an in-place change by: made each call (cheap)
        return _make_kernels(w)
    key = (id(w), w._version, w.data_ptr(), w.dtype)
    with _LOCK:
        cached = _KERNELS.get(conv)
        if cached is not None and cached[0] == key:
            return cached[1]
    kernels = _make_kernels(w)
    with _LOCK:
        _KERNELS[conv] = (key, kernels)
    return kernels


def _make_kernels(w: Tensor) -> Tensor:
    """(4, Cout, C, 2, 2): rows [w0, w1 + w2] (phase 0) or [w0 + w1, w2] (phase 1), the same for columns;
    summed in float64, rounded once."""
    w64 = w.detach().to(torch.float64)

    def taps(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        a, b, c = t.unbind(dim)
        return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)

    rows = taps(w64, 2)
    phases = [col for row in rows for col in taps(row, 3)]  # order (0, 0), (0, 1), (1, 0), (1, 1)
    return torch.stack(phases).to(w.dtype).contiguous()
