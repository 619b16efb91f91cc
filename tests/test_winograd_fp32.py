"""fp32 3x3 convolutions by Winograd's F(2x2, 3x3) in PyTorch ops (``nn/winograd.py``, ``conv3x3_fp32``):
the convolution itself (against float64 ``F.conv2d``, the independent reference), which convolutions take
that path, and the packed session's use of it. Runs on every CPU (no native kernels needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentforge.nn import packed, winograd


def conv_layer(cin, cout, bias=True, seed=0, mode="zeros"):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias, padding_mode=mode).requires_grad_(False)
    return conv.to(memory_format=torch.channels_last)


def rand(*shape, seed=1, channels_last=True):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def exact(x, conv, wraps=False):
    padded = F.pad(x.double(), (1, 1, 1, 1), mode="circular" if wraps else "constant")
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(padded, conv.weight.double(), bias)


def rel_rms(got, ref):
    return float((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


CASES = [  # (batch, in, out, height, width, bias, circular, channels-last input)
    (2, 32, 48, 16, 16, True, False, True),
    (1, 8, 16, 6, 10, False, False, True),
    (3, 5, 7, 4, 2, True, True, False),  # odd channel counts, one row of tiles, a channels-first input
    (1, 16, 8, 2, 2, True, True, True),  # a single tile, wrapping
    (2, 64, 32, 12, 8, True, False, False),
]


@pytest.mark.parametrize("case", CASES)
def test_fp32_winograd_is_the_convolution(case):
    n, cin, cout, h, w, bias, wraps, cl = case
    conv = conv_layer(cin, cout, bias=bias, mode="circular" if wraps else "zeros")
    x = rand(n, cin, h, w, channels_last=cl)
    got = winograd.conv3x3_fp32(x, conv.weight, conv.bias, wraps=wraps)
    ref = exact(x, conv, wraps)
    assert got.shape == (n, cout, h, w) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    # fp32 rounding only (the direct fp32 convolution is about 1e-6 from float64 on these sizes)
    assert rel_rms(got, ref) < 5e-6
    if wraps:  # the wrap is really used: zero padding differs at the border
        assert rel_rms(got, exact(x, conv)) > 1e-2


def test_bands_of_tile_rows_give_the_same_result(monkeypatch):
    conv = conv_layer(16, 32)
    x = rand(2, 16, 14, 10)
    monkeypatch.setattr(winograd, "_band_rows_fp32", lambda *shape: 7)
    whole = winograd.conv3x3_fp32(x, conv.weight, conv.bias)
    monkeypatch.setattr(winograd, "_band_rows_fp32", lambda *shape: 2)  # 7 tile rows: 2+2+2+1
    banded = winograd.conv3x3_fp32(x, conv.weight, conv.bias)
    assert torch.equal(whole, banded)
    assert rel_rms(banded, exact(x, conv)) < 5e-6


def test_band_rows_split_large_maps_and_keep_few_tiles_whole(monkeypatch):
    """Bands keep V in the caches but read U once each: many tiles and few channels go in bands of
    ``FP32_BAND_BYTES``, few tiles and many channels (where U's re-reads would cost more) in one."""
    monkeypatch.setattr(winograd, "FP32_BAND_BYTES", 8 << 20)
    # SD1.5's 64x64 level, batch 2, 320 -> 320: V 42 MB against U 6.5 MB
    assert winograd._band_rows_fp32(2, 32, 32, 320, 320) == (8 << 20) // (16 * 2 * 32 * 320 * 4)
    # the VAE's 512 px level, 128 -> 128
    assert winograd._band_rows_fp32(1, 256, 256, 128, 128) < 256
    # 32x32, 1280 -> 640 and 16x16, 2560 -> 1280: U (52, 210 MB) would be read 6 and 2 times
    assert winograd._band_rows_fp32(2, 16, 16, 1280, 640) == 16
    assert winograd._band_rows_fp32(2, 8, 8, 2560, 1280) == 8


@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
def test_either_weight_layout_gives_the_convolution(layout):
    """The filter transform reads a channels-last weight (as the fast layout leaves every convolution) in
    place and a contiguous one as (Cout C, 9): the same convolution either way."""
    conv = conv_layer(24, 40)
    if layout == "contiguous":
        conv.weight.data = conv.weight.data.contiguous()
        assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert not conv.weight.is_contiguous()
    x = rand(2, 24, 12, 8)
    assert rel_rms(winograd.conv3x3_fp32(x, conv.weight, conv.bias), exact(x, conv)) < 5e-6


def test_which_fp32_convolutions_take_winograd(monkeypatch):
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    monkeypatch.delenv("LATENTFORGE_KERNELS", raising=False)
    mid = torch.nn.Conv2d(256, 32, 3, padding=1).requires_grad_(False)
    assert winograd.usable(mid, rand(1, 256, 32, 32))  # MIN_PIXELS
    assert winograd.usable(mid, torch.empty(1, 256, 512, 512))  # FP32_MAX_PIXELS
    assert winograd.usable(mid, rand(1, 256, 16, 16))  # FP32_MIN_PIXELS: 256 over the batch
    assert winograd.usable(mid, rand(4, 256, 8, 8))
    assert not winograd.usable(mid, rand(2, 256, 8, 8))  # too few tiles: oneDNN
    assert not winograd.usable(mid, torch.empty(1, 256, 512, 514))  # larger than measured
    assert not winograd.usable(mid, rand(1, 256, 34, 33))  # odd width
    small = conv_layer(8, 16)
    assert not winograd.usable(small, rand(1, 8, 32, 32))  # FP32_MIN_CHANNELS: few channels, little to save
    assert winograd.usable(conv_layer(128, 128), rand(1, 128, 32, 32))  # the VAE's last level
    assert winograd.usable(torch.nn.Conv2d(2560, 1280, 3, padding=1).requires_grad_(False), rand(2, 2560, 16, 16))
    big = torch.nn.Conv2d(2560, 1920, 3, padding=1).requires_grad_(False)
    assert not winograd.usable(big, rand(1, 2560, 32, 32))  # filters above FP32_MAX_FILTER: not measured
    x = rand(1, 256, 32, 32)
    for conv in (
        torch.nn.Conv2d(256, 16, 3, stride=2, padding=1),
        torch.nn.Conv2d(256, 16, 1),
        torch.nn.Conv2d(256, 16, 3, padding=1, groups=2),
        torch.nn.Conv2d(256, 16, 3, padding=2, dilation=2),
        torch.nn.Conv2d(256, 16, 3, padding=1, padding_mode="reflect"),
    ):
        assert not winograd.usable(conv.requires_grad_(False), x)
    assert not winograd.usable(conv_layer(256, 16).requires_grad_(), x)  # autograd: PyTorch's convolution
    assert not winograd.usable(conv_layer(256, 16).double(), x.double())  # float64: PyTorch's convolution
    with torch.no_grad():
        assert winograd.usable(conv_layer(256, 16).requires_grad_(), x)
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "on")
    assert winograd.usable(small, rand(1, 8, 4, 6))  # every map size and channel count
    assert winograd.usable(big, rand(1, 2560, 8, 8))
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "off")
    assert not winograd.usable(mid, x)
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")  # latentforge's own convolution paths all off
    assert not winograd.usable(mid, x)


@pytest.fixture
def fp32_calls(monkeypatch):
    """Winograd's automatic choice, and the input shapes of the calls to ``conv3x3_fp32`` recorded."""
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    monkeypatch.delenv("LATENTFORGE_KERNELS", raising=False)
    calls = []
    real = winograd.conv3x3_fp32
    monkeypatch.setattr(winograd, "conv3x3_fp32", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


@pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN ops")
def test_packed_session_runs_fp32_maps_by_winograd_and_leaves_weights_as_they_were(fp32_calls):
    calls = fp32_calls
    net = torch.nn.Sequential(conv_layer(256, 256, seed=1), torch.nn.SiLU(), conv_layer(256, 32, seed=2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    big, small = rand(1, 256, 32, 32), rand(1, 256, 8, 8)

    def reference(x):
        return exact(F.silu(exact(x, net[0]).float()).to(memory_format=torch.channels_last), net[2])

    with torch.inference_mode(), packed.packed_session(net, repeated=True):
        out = net(big)
        assert len(calls) == 2 and net[0].weight.shape == (256, 256, 3, 3)  # the plain weight in place
        low = net(small)  # 8x8: oneDNN's packed convolution
        assert len(calls) == 2 and net[0].weight.numel() == 0
        again = net(big)  # Winograd again: the plain weight put back first
        assert len(calls) == 4 and net[0].weight.shape == (256, 256, 3, 3)
        with torch.no_grad():
            net[2].weight.mul_(-1)  # a weight changed in place (a LoRA merge): seen on the next call
        flipped = net(big)
        with torch.no_grad():
            net[2].weight.mul_(-1)
    assert rel_rms(out, reference(big)) < 5e-6 and torch.equal(out, again)
    assert rel_rms(low, reference(small)) < 5e-6
    assert rel_rms(flipped, -reference(big) + 2 * net[2].bias.double()[None, :, None, None]) < 5e-6
    assert type(net[0]) is torch.nn.Conv2d
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN ops")
def test_full_size_fp32_vae_decodes_by_winograd_and_small_ones_do_not(fp32_calls, monkeypatch):
    from latentforge.models.vae import AutoencoderKL, VAEConfig

    calls = fp32_calls
    torch.manual_seed(0)
    wide = AutoencoderKL(VAEConfig(base_channels=256, channel_mult=(1, 1), num_res_blocks=1)).eval()
    small = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)).eval()
    z = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        got = wide.decode(z)  # its 256-channel convolutions at 32x32 by Winograd
        by_winograd = len(calls)
        small.decode(z)
        assert len(calls) == by_winograd  # 64 channels at most: PyTorch's convolutions
        monkeypatch.setenv("LATENTFORGE_WINOGRAD", "off")
        ref = wide.decode(z)
    assert by_winograd >= 3 and len(calls) == by_winograd
    assert got.shape == (1, 3, 32, 32) and rel_rms(got, ref.double()) < 1e-5 and not torch.equal(got, ref)
