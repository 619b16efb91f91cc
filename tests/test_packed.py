"""Convolution weights packed once (latentforge.nn.packed, ``Pipeline.pack_weights``; issue 16).

References: the convolution written out from its definition in float64 (im2col + matrix product),
PyTorch's own ``F.conv2d``, and the tiny SD1 pipeline's images without packing.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentforge
from latentforge.nn import packed
from latentforge.nn.packed import PackedConv2d, pack_weights, packed_count, unpack_weights
from tiny import build_reference, save_folder

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN ops")


def conv_by_definition(x, w, b, stride, padding, groups):
    """out[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] x[n, g*C + c, i*s + u - p, j*s + v - p] in float64."""
    x, w = x.double(), w.double()
    n, _, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = torch.zeros(n, cout, oh, ow, dtype=torch.float64)
    per = cout // groups
    for o in range(cout):
        g = o // per
        for u in range(kh):
            for v in range(kw):
                patch = xp[:, g * cg : (g + 1) * cg, u : u + stride * oh : stride, v : v + stride * ow : stride]
                out[:, o] += torch.einsum("nchw,c->nhw", patch, w[o, :, u, v])
    return out + (0 if b is None else b.double()[None, :, None, None])


CASES = [  # cin, cout, kernel, stride, padding, groups, bias
    (8, 16, 3, 1, 1, 1, True),
    (16, 8, 1, 1, 0, 1, True),
    (8, 8, 3, 2, 1, 1, False),
    (8, 16, 3, 1, 1, 4, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolution_is_the_convolution(case, channels_last):
    cin, cout, k, stride, padding, groups, bias = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias)
    x = torch.randn(2, cin, 12, 10)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    expected = conv_by_definition(x, conv.weight, conv.bias, stride, padding, groups)
    assert pack_weights(conv) == 1 and type(conv) is PackedConv2d
    with torch.inference_mode():
        got = conv(x)
        again = conv(x)  # the packed weight reused
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)


def test_bf16_matches_pytorchs_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 16, 16, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        pack_weights(conv)
        got = conv(x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_layers_run_plain_where_the_cpus_onednn_cannot(dtype, monkeypatch):
    """Without AVX-512 oneDNN's weight reorder refuses bf16 and fp16 ("bf16 path needs the cpu support
    avx_ne_convert or avx512bw, ..."): a bf16 model crashed at its first convolution on AVX2 CPUs. Such
    layers now run PyTorch's own convolution, bit for bit."""
    from latentforge.nn import packed

    monkeypatch.setattr(packed, "_half_packable", lambda dt: False)  # as on an AVX2-only CPU
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(dtype)
    x = torch.randn(1, 8, 8, 8, dtype=dtype)
    with torch.inference_mode():
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        pack_weights(conv)
        got = conv(x)
    assert torch.equal(got, expected) and conv.weight.numel() == 8 * 8 * 9


def test_weight_changes_are_followed():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    pack_weights(conv)
    with torch.inference_mode():
        before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place, as the patcher merges LoRAs
        conv.bias.zero_()
    with torch.inference_mode():
        after = conv(x)
        bigger = conv(torch.randn(1, 4, 12, 12))  # another input shape: packed again
    torch.testing.assert_close(after, conv_by_definition(x, conv.weight, None, 1, 1, 1).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    assert bigger.shape == (1, 4, 12, 12)


def test_gradients_copies_and_saving_use_the_plain_module():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    keys = list(conv.state_dict())
    pack_weights(conv)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).sum().backward()  # training path: PyTorch's own convolution, with gradients
    assert conv.weight.grad is not None and x.grad is not None
    twin = copy.deepcopy(conv)
    buf = io.BytesIO()
    torch.save(conv, buf)
    assert list(twin.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(twin(x.detach()), conv(x.detach()))
    assert unpack_weights(conv) == 1 and type(conv) is torch.nn.Conv2d
    assert list(conv.state_dict()) == keys


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_folder(build_reference("sd1"), tmp_path_factory.mktemp("packed") / "sd1")


def test_pipeline_images_are_the_same(sd1_folder):
    pipe = latentforge.load(sd1_folder)
    args = dict(steps=3, seed=7, width=64, height=64, cfg_scale=5.0)
    plain = np.asarray(pipe.txt2img("a cat", **args).images[0], dtype=np.int16)
    n = pipe.pack_weights()
    assert n == packed_count(pipe.unet) + packed_count(pipe.vae) and n > 20
    fast = np.asarray(pipe.txt2img("a cat", **args).images[0], dtype=np.int16)
    assert np.abs(fast - plain).max() <= 1  # float32: the same convolution, at most rounding apart
    assert pipe.pack_weights(False) == n
    assert np.array_equal(np.asarray(pipe.txt2img("a cat", **args).images[0], dtype=np.int16), plain)


def test_cli_pack_weights_flag(sd1_folder, tmp_path):
    from PIL import Image

    from latentforge.cli import main

    args = ["txt2img", "a cube", "-m", str(sd1_folder), "-W", "64", "-H", "64", "--steps", "2", "--seed", "5", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--pack-weights", "-o", str(tmp_path / "packed.png")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)
    fast = np.asarray(Image.open(tmp_path / "packed.png"), dtype=np.int16)
    assert np.abs(fast - plain).max() <= 1


# ----- packed_session: one copy of each weight, the default of full-size CPU generations -------------------


def small_net(dtype=torch.float32):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 8, 3, 2)
    ).to(dtype)


def by_definition(net, x):
    """The same network evaluated with the float64 convolution written out above."""
    y = x.double()
    for m in net:
        if isinstance(m, torch.nn.Conv2d):
            y = conv_by_definition(y, m.weight, m.bias, m.stride[0], m.padding[0], m.groups)
        else:
            y = m(y)
    return y


def test_session_keeps_one_copy_and_gives_every_weight_back():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode(), packed.packed_session(net) as n:
        assert n == 3
        out = net(x)
        # once packed, the plain weights are swapped out: the packed copy is the only one
        assert all(m.weight.numel() == 0 for m in net if isinstance(m, torch.nn.Conv2d))
        again = net(x)
        other = net(torch.randn(1, 8, 20, 20))  # another input shape: repacked from the packed copy
    assert torch.equal(out, again)
    torch.testing.assert_close(out.double(), by_definition(net, x), rtol=1e-4, atol=1e-4)
    assert other.shape == (1, 8, 9, 9)
    assert all(type(m) is not PackedConv2d and m not in packed._CACHE for m in net) and not packed._SWAPPED
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the weights are ordinary parameters again: training works
    net(x.requires_grad_()).sum().backward()
    assert net[0].weight.grad is not None


def test_session_exit_hands_the_dropped_copies_pages_back_as_it_goes(monkeypatch):
    """Settling a session's layers (plain weights back, packed copies dropped) returns the freed heap every
    ``RELEASE_BYTES``, as the swap-outs do, rather than holding both copies of every weight until the end."""
    net = small_net()
    x = torch.randn(2, 8, 12, 12)
    bytes_per_layer = [m.weight.numel() * m.weight.element_size() for m in net if isinstance(m, torch.nn.Conv2d)]
    released = []
    with torch.inference_mode(), packed.packed_session(net):
        net(x)
        monkeypatch.setattr(packed, "RELEASE_BYTES", min(bytes_per_layer))
        monkeypatch.setattr(packed, "_release_freed", lambda: released.append(packed._FREED.update(bytes=0)))
    assert len(released) >= len(bytes_per_layer)  # one per settled layer (each at least RELEASE_BYTES)


def test_session_weight_changes_through_materialize_and_the_patcher():
    from latentforge.adapters.patcher import ModelPatcher

    net = small_net()
    patcher = ModelPatcher(lambda: {"unet": net})
    x = torch.randn(1, 8, 12, 12)
    with torch.inference_mode(), packed.packed_session(net):
        net(x)
        assert net[0].weight.numel() == 0
        # a LoRA-style patch in the middle of a session: the weight comes back first, then is repacked
        patcher.patch("lora:test", {"unet.0.weight": lambda w: w * 2.0})
        assert net[0].weight.shape == (16, 8, 3, 3)
        doubled = net(x)
        patcher.remove("lora:test")
        plain = net(x)
    assert torch.equal(net[0].weight, small_net()[0].weight)  # back to the loaded value bit for bit
    ref2 = small_net()
    with torch.no_grad():
        ref2[0].weight.mul_(2.0)
    torch.testing.assert_close(doubled.double(), by_definition(ref2, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain.double(), by_definition(small_net(), x), rtol=1e-4, atol=1e-4)


def test_session_falls_back_with_gradients():
    net = small_net()
    x = torch.randn(1, 8, 12, 12)
    with packed.packed_session(net):
        with torch.inference_mode():
            net(x)
        assert net[0].weight.numel() == 0
        y = net(x.requires_grad_())  # autograd: PyTorch's own path, on the weight put back
        y.sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.shape == (16, 8, 3, 3)


def test_generate_packs_full_size_unets_without_a_second_copy(sd1_folder, monkeypatch):
    import importlib

    gen = importlib.import_module("latentforge.pipelines.generate")  # the module, not the function

    pipe = latentforge.load(sd1_folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    args = dict(steps=3, seed=7, width=64, height=64, cfg_scale=5.0)
    plain = np.asarray(pipe.txt2img("a cat", **args).images[0], dtype=np.int16)  # tiny: not packed
    monkeypatch.setattr(gen, "PACK_MIN_UNET_PARAMS", 0)  # treat the tiny UNet as full-size
    seen = []

    seen_convs = set()

    def progress(p):
        convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        seen_convs.update(m for m in convs if isinstance(m, PackedConv2d))
        seen.append((sum(m.weight.numel() for m in convs), sum(isinstance(m, PackedConv2d) for m in convs)))

    reorders = []
    real = torch.ops.mkldnn._reorder_convolution_weight  # looked up on every call by nn/packed.py
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", lambda *a: reorders.append(1) or real(*a))
    fast = np.asarray(pipe.txt2img("a cat", progress=progress, **args).images[0], dtype=np.int16)
    assert seen and all(numel == 0 and n > 20 for numel, n in seen)  # during sampling: packed copies only
    assert np.abs(fast - plain).max() <= 1  # float32: the same convolutions, at most rounding apart
    # the packed copies stay for the next generation (nn/packed.py, keep=True), counted at full size
    packed_once = len(reorders)
    assert packed_once > 20 and all(
        m._parameters["weight"].numel() == 0 for m in pipe.unet.modules() if m in seen_convs
    )
    assert packed.numel(pipe.unet, nbytes=True) == sum(v.numel() * v.element_size() for v in before.values())
    again = np.asarray(pipe.txt2img("a cat", **args).images[0], dtype=np.int16)
    assert len(reorders) == packed_once and np.array_equal(again, fast)  # packed nothing, the same image
    after = pipe.unet.state_dict()  # wakes every layer: the loaded weights, bit for bit
    assert all(torch.equal(after[k], before[k]) for k in before) and packed_count(pipe.unet) == 0
    monkeypatch.setenv("LATENTFORGE_PACK", "0")
    seen.clear()
    off = np.asarray(pipe.txt2img("a cat", progress=progress, **args).images[0], dtype=np.int16)
    assert np.array_equal(off, plain) and all(numel > 0 for numel, _ in seen)


def test_sessions_on_one_module_take_turns_and_nest():
    import threading

    net = small_net()
    x = torch.randn(1, 8, 12, 12)
    ref = by_definition(net, x)
    inside, order = threading.Event(), []

    def second():
        inside.wait()
        with torch.inference_mode(), packed.packed_session(net):
            order.append("second")
            torch.testing.assert_close(net(x).double(), ref, rtol=1e-4, atol=1e-4)

    t = threading.Thread(target=second)
    t.start()
    with torch.inference_mode(), packed.packed_session(net):
        net(x)
        with packed.packed_session(net) as nested:  # same thread: reentrant, takes nothing
            assert nested == 0
            torch.testing.assert_close(net(x).double(), ref, rtol=1e-4, atol=1e-4)
        inside.set()
        t.join(timeout=0.5)
        assert t.is_alive()  # waiting for this session to end
        order.append("first")
    t.join(timeout=30)
    assert order == ["first", "second"] and not t.is_alive()
    assert net[0].weight.shape == (16, 8, 3, 3) and all(type(m) is not PackedConv2d for m in net)


# ----- linear layers: bf16 through oneDNN's linear with the weight packed once ---------------------------

needs_bf16_linear = pytest.mark.skipif(
    not packed._linear_available(), reason="oneDNN has no bf16 linear on this CPU (linears stay plain)"
)


def linear_by_definition(x, w, b):
    """y[..., o] = b[o] + sum_k x[..., k] w[o, k] in float64."""
    y = torch.einsum("...k,ok->...o", x.double(), w.double())
    return y if b is None else y + b.double()


def bf16_linear(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)


@needs_bf16_linear
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 64), (2, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_the_linear(shape, bias):
    lin = bf16_linear(64, 48, bias)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    expected = linear_by_definition(x, lin.weight, lin.bias)
    assert pack_weights(lin) == 1 and type(lin) is packed.PackedLinear
    with torch.inference_mode():
        got = lin(x)
        other_rows = lin(torch.randn(11, 64, dtype=torch.bfloat16))  # the row count packed for is a hint only
        again = lin(x)
    assert packed._CACHE[lin]["weight"].is_mkldnn  # the packed path ran, not nn.Linear's
    assert got.shape == expected.shape and got.dtype == torch.bfloat16 and other_rows.shape == (11, 48)
    # fp32 accumulation, one rounding to bf16: within bf16's half-ulp of the float64 result (plus slack)
    torch.testing.assert_close(got.double(), expected, rtol=8e-3, atol=1e-2)
    assert torch.equal(got, again)


@needs_bf16_linear
def test_packed_linear_follows_weight_changes_and_leaves_other_inputs_to_pytorch():
    lin = bf16_linear(32, 16)
    pack_weights(lin)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        lin(x)
    with torch.no_grad():
        lin.weight.mul_(-3.0)  # in place, as the patcher merges LoRAs: repacked
    with torch.inference_mode():
        torch.testing.assert_close(lin(x).double(), linear_by_definition(x, lin.weight, lin.bias), rtol=8e-3, atol=3e-2)
    # float32 input and weights: PyTorch's own linear (MKL), exactly nn.Linear's result
    lin32 = torch.nn.Linear(32, 16)
    pack_weights(lin32)
    x32 = torch.randn(4, 32)
    with torch.inference_mode():
        assert torch.equal(lin32(x32), F.linear(x32, lin32.weight, lin32.bias)) and lin32 not in packed._CACHE
    # autograd: the plain path, with gradients
    y = lin(x.requires_grad_())
    y.float().sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


@needs_bf16_linear
def test_session_swaps_linear_weights_but_not_the_geglu_projection():
    from latentforge.models.unet import FeedForward

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), FeedForward(32, mult=2), torch.nn.Linear(32, 8)).to(
        torch.bfloat16
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = net(x)
        with packed.packed_session(net) as n:
            assert n == 3  # the two outer linears and the feed-forward's output; not GEGLU's projection
            out = net(x)
            assert net[0].weight.numel() == 0 and net[2].weight.numel() == 0
            assert net[1].net[0].proj.weight.shape == (128, 32)  # GEGLU reads its halves: kept plain
    assert type(net[0]) is torch.nn.Linear and not packed._SWAPPED
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(out.float(), plain.float(), rtol=2e-2, atol=2e-2)
