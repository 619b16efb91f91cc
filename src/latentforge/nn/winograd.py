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

float32 (CPUs without native bf16, issue 16's AVX2 anchor): the same F(2x2, 3x3) (``conv3x3_fp32``): the
16 products as one batched matrix product (MKL, at the fp32 matmul peak), the input and output transforms
in one pass each by ``nn.native_avx2``'s kernels on AVX2 CPUs, elsewhere (and for circular padding) as
strided additions and subtractions in PyTorch ops. Its filters are transformed
on every call by one small matrix product (no cached copy: the memory stays that of the plain weights; a
channels-last weight, as the fast layout leaves them, is read in place), so it runs where that transform
is cheap next to the convolution and oneDNN's direct convolution is slower: at least ``FP32_MIN_PIXELS``
pixels over the batch and at most ``FP32_MAX_PIXELS`` per image, at least ``FP32_MIN_CHANNELS`` input
channels and at most ``FP32_MAX_FILTER`` input x output channels (at 512 px: SD1.5's 64x64, 32x32 and
16x16 levels, the VAE decoder's every level; not the UNet's 8x8 level, batch 2: 128 tiles are too few).
Measured on a 2-core AMD EPYC (AVX2, ``benchmarks/bench_winograd.py --fp32``): 1.2-2x oneDNN on those
shapes with the native transforms (1280 -> 1280 at 16x16, batch 2: 50 against 75 ms; at 8x8: 23.5
against 20.7); relative error against float64 about 1e-6, below the direct fp32 convolution's
(``tests/test_winograd_fp32.py``).
``LATENTFORGE_WINOGRAD``: ``auto`` (default: where the bf16 kernels run, ``nn.native.ready``, and the map
is that large; fp32 where described above), ``off`` (oneDNN's direct convolution), ``on`` (every map size).
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge import allocator
from latentforge.nn import native, native_avx2

MIN_PIXELS = 1024
# in a session that runs the module many times (a sampler's steps: ``packed_session(repeated=True)``),
# maps down to this size too (SD1.5's 16x16 level at 512 px: 680 MB of transformed filters, 0.7 s to
# make per generation, 0.15-0.3 s saved per step)
MIN_PIXELS_REPEATED = 256
# the most memory the transformed input of one convolution takes (larger inputs go in bands of rows)
BAND_BYTES = 64 << 20
# F(2x2, 3x3)'s filter transform
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
# fp32 (``conv3x3_fp32``): the fewest pixels over the batch, the largest map, the fewest input channels and
# the most input x output channels run by Winograd, and the transformed input of one band of tile rows
# (small enough to stay in the caches through the product and the output transform: 1.3-1.6x faster than
# one band of 64 MB at 128x128; ``_band_rows_fp32`` keeps one band where U is large next to V)
FP32_MIN_PIXELS = 256  # over the whole batch: tiles enough to pay for the per-call filter transform
FP32_MAX_PIXELS = 512 * 512  # per image
FP32_MIN_CHANNELS = 128
FP32_MAX_FILTER = 2560 * 1280
FP32_BAND_BYTES = 8 << 20
# the 16 x 9 matrix taking a flattened 3x3 filter to its flattened 4x4 transform (G g G^T = kron(G, G) vec g)
_KRON = torch.kron(G, G).float()


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
    ``LATENTFORGE_WINOGRAD=on``) and the bf16 kernels available. An fp32 input goes by the fp32 path's own
    rule (``_usable_fp32``: map size and channel counts, no native kernels needed)."""
    w = conv.weight
    m = mode()
    if x.dtype == torch.float32:
        return _usable_fp32(conv, x, m)
    return (
        m != "off"
        and _plain_3x3(conv)
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


def _plain_3x3(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode in ("zeros", "circular")
    )


def _usable_fp32(conv: nn.Conv2d, x: Tensor, m: str) -> bool:
    w = conv.weight
    pixels = x.shape[-2] * x.shape[-1] if x.dim() == 4 else 0
    return (
        m != "off"
        and native.mode() != "off"
        and _plain_3x3(conv)
        and x.dim() == 4
        and x.device.type == "cpu"
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and (conv.bias is None or (conv.bias.dtype == torch.float32 and conv.bias.device.type == "cpu"))
        and x.shape[2] % 2 == 0
        and x.shape[3] % 2 == 0
        and x.numel() > 0
        and (m == "on" or (x.shape[0] * pixels >= FP32_MIN_PIXELS and pixels <= FP32_MAX_PIXELS and _fp32_shape(conv)))
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def _fp32_shape(conv: nn.Conv2d) -> bool:
    return conv.in_channels >= FP32_MIN_CHANNELS and conv.in_channels * conv.out_channels <= FP32_MAX_FILTER


def conv3x3_fp32(
    x: Tensor, weight: Tensor, bias: Tensor | None, wraps: bool = False, prologue: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (circular padding with ``wraps``) of an fp32 CPU input of even
    height and width by Winograd's F(2x2, 3x3) in PyTorch ops; channels-last (N, Cout, H, W). Call where
    ``usable`` said yes. Works in bands of tile rows whose transformed input takes at most ``FP32_BAND_BYTES``;
    the transformed filters and each band's intermediates live in the thread's reused workspace (fresh
    tens of MB per call would be page-faulted in on every call). ``prologue``: (scale, shift), the input is
    silu(x scale + shift) per image and channel (``nn.packed.norm_silu_conv``; native transforms only)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    if prologue is not None or (not wraps and native_avx2.winograd_usable(x, k)):
        return _conv3x3_fp32_native(x, weight, bias, prologue)
    padded = F.pad(x, (1, 1, 1, 1), mode="circular" if wraps else "constant")
    padded = padded.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # an NHWC view
    th, tw = h // 2, w // 2
    band = _band_rows_fp32(n, th, tw, c, k)
    tiles = n * band * tw
    # workspace: U (16 x Cout x C); per band the row-transformed input (4, N, band, W + 2, C), V (16, tiles,
    # C), M (16, tiles, Cout), the row sums of M (4, tiles, Cout) and one (tiles, Cout) temporary
    sizes = (16 * k * c, 4 * n * band * (w + 2) * c, 16 * tiles * c, 16 * tiles * k, 4 * tiles * k, tiles * k)
    parts = _workspace(sum(sizes), torch.float32)[: sum(sizes)].split(sizes)
    ut = _filters_fp32(weight, parts[0])
    out = torch.empty(n, th, 2, tw, 2, k)  # tile row, row in tile, tile column, column in tile, channel
    for t0 in range(0, th, band):
        t1 = min(th, t0 + band)
        _band_fp32(padded[:, 2 * t0 : 2 * t1 + 2], ut, out[:, t0:t1], parts[1:])
    out = out.view(n, h, w, k)
    if bias is not None:
        out += bias.detach()
    return out.permute(0, 3, 1, 2)  # channels-last (N, Cout, H, W)


def _conv3x3_fp32_native(x: Tensor, weight: Tensor, bias: Tensor | None, prologue=None) -> Tensor:
    """``conv3x3_fp32`` with its transforms in ``nn.native_avx2``'s kernels (one pass each, the padding read
    as zeros, the bias added by the output transform); the products the same batched MKL product."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = h // 2, w // 2
    band = _band_rows_fp32(n, th, tw, c, k)
    tiles = n * band * tw
    sizes = (16 * k * c, 16 * tiles * c, 16 * tiles * k)  # U, then per band V and M
    u, v, m = _workspace(sum(sizes), torch.float32)[: sum(sizes)].split(sizes)
    ut = _filters_fp32(weight, u)
    out = torch.empty(n, h, w, k)
    for t0 in range(0, th, band):
        t1 = min(th, t0 + band)
        count = n * (t1 - t0) * tw
        vb, mb = v[: 16 * count * c].view(16, count, c), m[: 16 * count * k].view(16, count, k)
        native_avx2.winograd_input(x, (t0, t1), vb, prologue)
        torch.bmm(vb, ut, out=mb)
        native_avx2.winograd_output(mb, bias, out, (t0, t1))
    return out.permute(0, 3, 1, 2)  # channels-last (N, Cout, H, W)


def _band_rows_fp32(n: int, th: int, tw: int, c: int, k: int) -> int:
    """Tile rows per band: bands whose V takes ``FP32_BAND_BYTES`` stay in the caches through the product and
    the output transform, but every band reads all of U again. One band where those extra reads of U would
    outweigh writing V and M out to memory and reading them back (few tiles, many channels: 1280 -> 640 at
    32x32, batch 2: 79.6 against 95.3 ms; 1920 -> 640 118 against 146 ms)."""
    band = max(1, min(th, FP32_BAND_BYTES // (16 * n * tw * c * 4)))
    bands = -(-th // band)
    if (bands - 1) * k * c >= 2 * n * th * tw * (c + k):  # in units of 16 floats: U re-read, V and M twice
        return th
    return band


def _filters_fp32(weight: Tensor, buf: Tensor) -> Tensor:
    """U = G g G^T of the (Cout, C, 3, 3) filters in fp32, made in ``buf`` (16 Cout C floats) as one product
    of the 16 x 9 transform with the weights; returned as the (16, C, Cout) right-hand side of the products.
    A channels-last weight (as ``to_fast_layout`` leaves every convolution) is multiplied in place as
    (Cout, 9, C) into U laid out (Cout, 16, C): read as (Cout C, 9), it had to be copied first (1280 x 1280:
    41 against 7 ms); the strided product after it runs as fast."""
    w = weight.detach()
    k, c = w.shape[:2]
    if w.permute(0, 2, 3, 1).is_contiguous():
        u = buf.view(k, 16, c)
        torch.matmul(_KRON, w.permute(0, 2, 3, 1).view(k, 9, c), out=u)
        return u.permute(1, 2, 0)
    u = buf.view(16, k, c)
    torch.mm(_KRON, w.reshape(k * c, 9).t(), out=u.view(16, k * c))
    return u.transpose(1, 2)


def _band_fp32(xp: Tensor, ut: Tensor, out: Tensor, work: tuple[Tensor, ...]) -> None:
    """One band: ``xp`` the padded NHWC input rows of ``out.shape[1]`` tile rows (2 per tile, plus 2);
    ``work``: room for the intermediates (``conv3x3_fp32``), used from the front for a shorter last band."""
    n, _, cols, c = xp.shape
    th, tw, k = out.shape[1], out.shape[3], ut.shape[2]
    tiles = n * th * tw
    rt = work[0][: 4 * n * th * cols * c].view(4, n, th, cols, c)
    v = work[1][: 16 * tiles * c].view(4, 4, n, th, tw, c)
    m = work[2][: 16 * tiles * k].view(4, 4, n, th, tw, k)
    rows_sum = work[3][: 4 * tiles * k].view(4, n, th, tw, k)
    tmp = work[4][: tiles * k].view(n, th, tw, k)
    # B^T d B, rows then columns; B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    r = [xp[:, i : i + 2 * th : 2] for i in range(4)]
    torch.sub(r[0], r[2], out=rt[0])
    torch.add(r[1], r[2], out=rt[1])
    torch.sub(r[2], r[1], out=rt[2])
    torch.sub(r[1], r[3], out=rt[3])
    for i in range(4):
        d = [rt[i][:, :, j : j + 2 * tw : 2] for j in range(4)]
        torch.sub(d[0], d[2], out=v[i, 0])
        torch.add(d[1], d[2], out=v[i, 1])
        torch.sub(d[2], d[1], out=v[i, 2])
        torch.sub(d[1], d[3], out=v[i, 3])
    torch.bmm(v.view(16, tiles, c), ut, out=m.view(16, tiles, k))
    # A^T m A, rows then columns; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
    for a in range(2):
        if a == 0:
            torch.add(m[0], m[1], out=rows_sum).add_(m[2])
        else:
            torch.sub(m[1], m[2], out=rows_sum).sub_(m[3])
        torch.add(rows_sum[0], rows_sum[1], out=tmp)
        torch.add(tmp, rows_sum[2], out=out[:, :, a, :, 0])
        torch.sub(rows_sum[1], rows_sum[2], out=tmp)
        torch.sub(tmp, rows_sum[3], out=out[:, :, a, :, 1])


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
_BUFFERS: dict[tuple, Tensor] = {}
_BUFFERS_LOCK = threading.Lock()


def _workspace(numel: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    key = (threading.get_ident(), dtype)
    with _BUFFERS_LOCK:
        buf = _BUFFERS.get(key)
        if buf is None or buf.numel() < numel:
            _BUFFERS[key] = None  # the old one freed before the larger one is mapped
            _BUFFERS[key] = buf = allocator.mapped_empty((numel,), dtype)
    return buf


def release() -> None:
    """Free the transformed-input buffers of every thread."""
    with _BUFFERS_LOCK:
        _BUFFERS.clear()
