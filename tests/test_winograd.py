"""3x3 convolutions by Winograd's F(2x2, 3x3) (nn/winograd.py, nn/kernels/winograd_bf16.cpp; issue 16).

References: the convolution computed in float64 by PyTorch on the same bf16 inputs and filters (the
definition), with oneDNN's bf16 convolution as the yardstick of bf16 accuracy; and F(2x2, 3x3) written out
here in float64 from Lavin & Gray's matrices, with the transformed tiles and filters rounded to bf16 as the
kernel rounds them, which the kernel must match to fp32 accumulation error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentforge.nn import native, packed, winograd

HAS_BF16 = "avx512_bf16" in native._cpu_flags()
pytestmark = pytest.mark.skipif(
    not HAS_BF16 or native._compiler() is None, reason="needs AVX512-BF16 and a C++ compiler"
)


@pytest.fixture(autouse=True)
def kernel_env(forced_kernels):
    """The kernels forced on, Winograd at every map size unless a test says otherwise (conftest.py)."""
    yield


def make(cin, cout, bias=True, seed=0, channels_last=True):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(torch.bfloat16).requires_grad_(False)
    return conv.to(memory_format=torch.channels_last) if channels_last else conv


def rand(*shape, seed=1, channels_last=True):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return x.to(memory_format=torch.channels_last) if channels_last else x


def rel_rms(got, ref):
    return float((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


# F(2x2, 3x3) (Lavin & Gray 2016, section 4.1)
BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


def winograd_in_float64(x, w, b):
    """F(2x2, 3x3) over the zero-padded input, in float64 except that V = B^T d B and U = G g G^T are
    rounded to bf16 (the kernel's only roundings before its fp32 sums and the output's final one)."""
    n, _, h, wd = x.shape
    th, tw = (h + 1) // 2, (wd + 1) // 2
    xp = F.pad(x.double(), (1, 1 + 2 * tw - wd, 1, 1 + 2 * th - h))  # room for whole 4x4 tiles
    tiles = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # (n, c, th, tw, 4, 4)
    v = (BT @ tiles @ BT.T).bfloat16().double()
    u = (G @ w.double() @ G.T).bfloat16().double()  # (cout, c, 4, 4)
    m = torch.einsum("nctsij,ocij->notsij", v, u)
    y = AT @ m @ AT.T  # (n, cout, th, tw, 2, 2)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, w.shape[0], 2 * th, 2 * tw)[:, :, :h, :wd]
    return y if b is None else y + b.double()[None, :, None, None]


CASES = [  # (batch, in, out, height, width, bias): SD's shapes, odd sizes, tails of the 14-tile groups
    (2, 320, 320, 16, 16, True),
    (1, 64, 32, 9, 7, True),
    (2, 4, 64, 5, 6, False),  # 4 input channels: the UNet's conv_in
    (3, 34, 96, 3, 11, True),  # channels not a multiple of 16, one row of tiles + a partial one
    (1, 128, 32, 1, 1, True),
]


@pytest.mark.parametrize("case", CASES)
def test_winograd_convolution_is_the_convolution(case):
    n, cin, cout, h, w, bias = case
    conv = make(cin, cout, bias)
    x = rand(n, cin, h, w)
    with torch.inference_mode():
        got = winograd.conv3x3(x, winograd.transform(conv.weight), conv.bias, cout)
        direct = F.conv2d(x, conv.weight, conv.bias, padding=1)  # oneDNN's bf16 convolution
    exact = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), padding=1)
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    # the algorithm, to fp32 accumulation and one bf16 rounding of the output
    torch.testing.assert_close(got.double(), winograd_in_float64(x, conv.weight, conv.bias), rtol=8e-3, atol=1e-2)
    # against the definition: bf16 accuracy, within a few times oneDNN's own bf16 error
    assert rel_rms(got, exact) < max(4 * rel_rms(direct, exact), 8e-3)


@pytest.mark.parametrize("loop", ["few-tiles", "many-tiles"])
@pytest.mark.parametrize(
    "case",
    [*CASES, (2, 32, 64, 32, 30, True), (1, 16, 1024, 6, 6, True)],  # 35 groups: 3 uneven batches; 4 T < Cout
)
def test_both_loops_are_the_convolution_to_the_bit(case, loop):
    """The kernel's two loop orders (few tiles and many filters, or the other way round) compute the same
    products in the same order: each matches F(2x2, 3x3) in float64 and the automatic choice bit for bit."""
    n, cin, cout, h, w, bias = case
    conv = make(cin, cout, bias)
    x = rand(n, cin, h, w)
    u = winograd.transform(conv.weight)
    with torch.inference_mode():
        auto = winograd.conv3x3(x, u, conv.bias, cout)
        native.winograd_loop(loop)
        try:
            forced = winograd.conv3x3(x, u, conv.bias, cout)
        finally:
            native.winograd_loop("auto")
    torch.testing.assert_close(forced.double(), winograd_in_float64(x, conv.weight, conv.bias), rtol=8e-3, atol=1e-2)
    assert torch.equal(forced, auto)


def test_unknown_loop_is_refused():
    with pytest.raises(ValueError, match="few-tiles"):
        native.winograd_loop("fast")


def test_input_layout_threads_and_bands_do_not_change_the_result(monkeypatch):
    conv = make(64, 64)
    x = rand(2, 64, 13, 10)
    u = winograd.transform(conv.weight)
    with torch.inference_mode():
        a = winograd.conv3x3(x, u, conv.bias, 64)
        b = winograd.conv3x3(x.contiguous(), u, conv.bias, 64)  # NCHW input: made channels-last first
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            c = winograd.conv3x3(x, u, conv.bias, 64)
        finally:
            torch.set_num_threads(old)
        for limit in (1, 2 * 5 * 16 * 64 * 2 * 3):  # V in bands of one tile row, then of three (7 = 3 + 3 + 1)
            monkeypatch.setattr(winograd, "BAND_BYTES", limit)
            d = winograd.conv3x3(x, u, conv.bias, 64)
            assert torch.equal(a, d)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_transform_is_g_g_gt_packed():
    w = torch.randn(64, 6, 3, 3).bfloat16()
    u = winograd.transform(w)
    assert u.shape == (2, 16, 3, 32, 2) and u.is_contiguous() and u.dtype == torch.bfloat16
    full = (G @ w.double() @ G.T).bfloat16()  # (64, 6, 4, 4)
    # block ob, tile position (i, j), channel pair p, lane l, member e = U[32 ob + l, 2 p + e, i, j]
    for ob, i, j, p, lane, e in [(0, 0, 0, 0, 0, 0), (1, 3, 2, 2, 31, 1), (0, 1, 3, 1, 7, 0), (1, 2, 1, 0, 12, 1)]:
        assert u[ob, i * 4 + j, p, lane, e] == full[32 * ob + lane, 2 * p + e, i, j]


def test_usable_refuses_what_it_cannot_do(monkeypatch):
    x = rand(1, 8, 32, 32)
    assert winograd.usable(make(8, 32), x)
    for conv in (
        torch.nn.Conv2d(8, 32, 3, stride=2, padding=1),
        torch.nn.Conv2d(8, 32, 1),
        torch.nn.Conv2d(8, 32, 3, padding=1, groups=2),
        torch.nn.Conv2d(8, 32, 3, padding=2, dilation=2),
        torch.nn.Conv2d(8, 16, 3, padding=1),  # output channels not a multiple of 32
        torch.nn.Conv2d(8, 32, 3, padding=1, padding_mode="reflect"),
    ):
        assert not winograd.usable(conv.to(torch.bfloat16), x)
    assert winograd.usable(make(8, 32).float(), x.float())  # fp32: PyTorch ops (test_winograd_fp32.py)
    assert not winograd.usable(make(7, 32), rand(1, 7, 32, 32))  # odd input channels
    assert not winograd.usable(make(8, 32).requires_grad_(), x)  # autograd: PyTorch's convolution
    with torch.no_grad():
        assert winograd.usable(make(8, 32).requires_grad_(), x)
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    assert winograd.usable(make(8, 32), rand(1, 8, 32, 32)) and not winograd.usable(make(8, 32), rand(1, 8, 16, 16))
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "off")
    assert not winograd.usable(make(8, 32), x)
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "on")
    native.reset()
    assert not winograd.usable(make(8, 32), x)
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "fast")
    with pytest.raises(ValueError, match="LATENTFORGE_WINOGRAD"):
        winograd.mode()


def test_session_runs_large_maps_by_winograd_and_keeps_their_plain_weight(monkeypatch):
    from latentforge.adapters.patcher import ModelPatcher

    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    net = torch.nn.Sequential(make(16, 32, seed=1), torch.nn.SiLU(), make(32, 32, seed=2)).to(
        memory_format=torch.channels_last
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    big, small = rand(1, 16, 32, 32), rand(1, 16, 8, 8)
    exact = F.conv2d(F.silu(F.conv2d(big.double(), net[0].weight.double(), net[0].bias.double(), padding=1)),
                     net[2].weight.double(), net[2].bias.double(), padding=1)  # fmt: skip
    patcher = ModelPatcher(lambda: {"unet": net})
    with torch.inference_mode(), packed.packed_session(net):
        out = net(big)
        assert all(m in packed._WINO and m.weight.shape == (32, m.in_channels, 3, 3) for m in (net[0], net[2]))
        net(small)  # an 8x8 map: oneDNN's packed convolution, the plain weight swapped out, U dropped
        assert net[0] not in packed._WINO and net[0].weight.numel() == 0
        again = net(big)  # back to Winograd: the plain weight put back first
        assert net[0] in packed._WINO and net[0].weight.shape == (32, 16, 3, 3)
        patcher.patch("lora:test", {"unet.0.weight": lambda w: -w})  # in place: U made again
        flipped = net(big)
        patcher.remove("lora:test")
    assert rel_rms(out, exact) < 1e-2 and torch.equal(out, again)
    ref = F.conv2d(F.silu(-F.conv2d(big.double(), before["0.weight"].double(), None, padding=1)
                          + before["0.bias"].double()[None, :, None, None]),
                   net[2].weight.double(), net[2].bias.double(), padding=1)  # fmt: skip
    assert rel_rms(flipped, ref) < 1e-2
    assert not packed._SWAPPED and type(net[0]) is torch.nn.Conv2d
    assert not winograd._BUFFERS  # the transformed-input buffers freed with the session
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert net[0] not in packed._WINO and net[2] not in packed._WINO  # dropped with the session
    # inside a session the filters serve every call while the weight is unchanged; a change makes them again
    with torch.inference_mode(), packed.packed_session(net):
        assert torch.equal(net(big), out)
        kept = packed._WINO[net[2]][1]
        net(big)
        assert packed._WINO[net[2]][1] is kept
        with torch.no_grad():
            net[2].weight.mul_(0.5)
        net(big)
        assert packed._WINO[net[2]][1] is not kept
    # pack_weights (both copies kept, no session): the filters stay until forget
    packed.pack_weights(net)
    with torch.inference_mode():
        net(big)
    assert net[0] in packed._WINO and net[2] in packed._WINO
    packed.forget(net)
    assert net[0] not in packed._WINO and net[2] not in packed._WINO
    packed.unpack_weights(net)


def test_native_filter_transform_equals_the_float64_one(monkeypatch):
    w = torch.randn(96, 38, 3, 3).bfloat16()
    native_u = winograd.transform(w.to(memory_format=torch.channels_last))  # the kernel, any strides
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    native.reset()
    torch_u = winograd.transform(w)  # PyTorch in float64, rounded once
    assert torch.equal(native_u, torch_u)
    full = (G @ w.double() @ G.T).bfloat16()
    assert torch.equal(torch_u[1, 4 * 2 + 1, 5, 17, 1], full[32 + 17, 11, 2, 1])


def test_repeated_session_runs_smaller_maps_by_winograd_and_the_vae_sheds_session_filters(monkeypatch):
    from latentforge.models.vae import cpu_fast_path

    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "auto")
    net = make(16, 32, seed=3)
    mid = rand(1, 16, 16, 16, seed=4)  # 256 pixels
    exact = F.conv2d(mid.double(), net.weight.double(), net.bias.double(), padding=1)
    by_winograd = winograd.conv3x3(mid, winograd.transform(net.weight), net.bias, 32)
    vae_like = torch.nn.Conv2d(4, 4, 1).bfloat16()
    with torch.inference_mode():
        with packed.packed_session(net):  # not repeated: a 16x16 map stays on oneDNN
            direct = net(mid)
            assert net not in packed._WINO
        with packed.packed_session(net, repeated=True):
            out = net(mid)
            assert net in packed._WINO
            with cpu_fast_path(vae_like, mid):  # the VAE drops the open session's filters before it runs
                assert net not in packed._WINO
            again = net(mid)  # made again on use
            assert net in packed._WINO
        assert net not in packed._WINO  # dropped with the session
    assert torch.equal(out, by_winograd) and torch.equal(again, out) and not torch.equal(direct, out)
    assert rel_rms(out, exact) < 1e-2 and rel_rms(direct, exact) < 1e-2


def test_session_hands_the_swapped_out_weights_pages_back(monkeypatch):
    from latentforge import allocator

    calls = []
    monkeypatch.setattr(allocator, "release", lambda: calls.append(1) or True)
    net = torch.nn.Sequential(make(16, 32, seed=1), torch.nn.SiLU(), make(32, 32, seed=2))
    small = rand(1, 16, 8, 8)
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "off")
    with torch.inference_mode(), packed.packed_session(net):
        net(small)  # the first call swaps the plain weights out: their pages go back once
        assert len(calls) == 1
        net(small)  # nothing freed since
        assert len(calls) == 1
    assert len(calls) == 2  # and the packed copies' on exit
    monkeypatch.setattr(packed, "RELEASE_BYTES", 32 * 16 * 9 * 2)  # the first weight's size: during the call
    with torch.inference_mode(), packed.packed_session(net):
        net(small)
        assert len(calls) == 4  # after each swap-out (two weights); nothing left for the end of the call
    assert len(calls) == 5
    assert not net._forward_hooks
