"""latentforge's fp32 AVX2 kernels (nn/native_avx2.py, nn/kernels/*_avx2.cpp): attention against the
formula computed here in float64, softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), with
PyTorch's SDPA as the yardstick of fp32 accuracy; GEGLU against its definition, value * gelu(gate) with
the erf GELU (Hendrycks & Gimpel 2016), with PyTorch's plain fp32 ops as the yardstick; the dispatch and
the fallbacks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from attention_ref import exact, geglu_exact, geglu_plain, sdpa
from latentforge.nn import native, native_avx2
from latentforge.nn.attention import attention

HAS_AVX2 = {"avx2", "fma"} <= native._cpu_flags()
pytestmark = pytest.mark.skipif(not HAS_AVX2 or native._compiler() is None, reason="needs AVX2 and a C++ compiler")


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch, tmp_path_factory):
    """The kernels forced on (also on AVX-512 CPUs), built once into a test cache folder."""
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    monkeypatch.setattr(native_avx2, "MIN_GEGLU_ELEMENTS", 0)
    native.reset()
    yield
    native.reset()


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


SHAPES = [
    # (batch, queries, keys, heads, head width): SD's shapes and awkward ones (partial tiles and blocks)
    (2, 1024, 1024, 8, 40),  # SD1.5 UNet, first level (at 256 px)
    (2, 1024, 77, 8, 80),  # cross-attention: a partial group of 8 keys
    (2, 256, 256, 10, 64),  # SDXL/SD2 head width
    (2, 64, 64, 8, 160),
    (3, 333, 517, 3, 8),  # queries not a multiple of 6 or 48, keys of 8 or 256
    (1, 1, 300, 2, 16),
    (1, 70, 1, 4, 24),
]


@pytest.mark.parametrize("b,nq,nk,heads,d", SHAPES)
def test_attention_matches_the_formula_as_well_as_sdpa(b, nq, nk, heads, d):
    c = heads * d
    q, k, v = rand(b, nq, c, scale=1.5, seed=1), rand(b, nk, c, scale=1.5, seed=2), rand(b, nk, c, seed=3)
    ref = exact(q, k, v, heads)
    ours = native_avx2.attention_fp32(q, k, v, heads)
    assert ours.dtype == torch.float32 and ours.shape == (b, nq, c)
    err = (ours.double() - ref).abs()
    err_sdpa = (sdpa(q, k, v, heads).double() - ref).abs()
    # fp32 rounding of the scores, the exponentials and the sums: within a small factor of PyTorch's kernel
    assert err.max() <= 3 * err_sdpa.max() + 1e-6
    assert err.mean() <= 2 * err_sdpa.mean() + 1e-7


def test_strided_inputs():
    """q, k and v as column slices of one wider tensor (token stride 3C, as a fused projection gives)."""
    heads, d = 4, 16
    qkv = rand(2, 200, 3 * heads * d, seed=4)
    q, k, v = qkv.split(heads * d, dim=-1)
    ours = native_avx2.attention_fp32(q, k, v, heads)
    assert (ours.double() - exact(q, k, v, heads)).abs().max() < 1e-5


def test_online_softmax_finds_a_late_maximum():
    """Large scores whose maximum sits in the last block of keys: the running maximum and the rescaling
    of the accumulated output must give that key's value (the formula: one weight near 1)."""
    heads, d, nk = 1, 40, 1000
    base = rand(1, 1, d, seed=6)
    q = base + rand(1, 64, d, scale=0.1, seed=7)
    k = rand(1, nk, d, seed=8)
    k[0, nk - 3] = base[0, 0] * 3  # aligned with every query (score ~ 3 |base|^2), 4th block of 256
    v = rand(1, nk, d, seed=9)
    ours = native_avx2.attention_fp32(q, k, v, heads).double()
    ref = exact(q, k, v, heads)
    assert (ours - ref).abs().max() < 1e-5
    assert (ref[0] - v[0, nk - 3].double()).abs().max() < 0.05  # the case really is dominated by that key


@pytest.mark.parametrize("nk", [77, 517])
def test_all_scores_far_below_zero_with_a_partial_group_of_keys(nk):
    """Every score near -100 and a key count that leaves a partial group of 8: the zero-padded key lanes
    must not count as the row's maximum (a maximum of 0 would underflow every probability)."""
    heads, d = 2, 40
    base = rand(1, 1, heads * d, seed=13)
    q = 4 * base + rand(1, 50, heads * d, scale=0.3, seed=14)
    k = -4 * base + rand(1, nk, heads * d, scale=0.3, seed=15)
    v = rand(1, nk, heads * d, seed=16)
    ref = exact(q, k, v, heads)
    qq, kk = (t.double().reshape(1, -1, heads, d).transpose(1, 2) for t in (q, k))
    assert (qq @ kk.transpose(-1, -2) / math.sqrt(d)).max() < -60  # the case really is far below zero
    ours = native_avx2.attention_fp32(q, k, v, heads).double()
    assert torch.isfinite(ours).all()
    # scores of -100 carry fp32 rounding of about 1e-5 into the exponent: PyTorch's kernel as the yardstick
    assert (ours - ref).abs().max() <= 3 * (sdpa(q, k, v, heads).double() - ref).abs().max() + 1e-6


def test_same_result_with_any_thread_count():
    q, k, v = rand(2, 700, 320, seed=10), rand(2, 700, 320, seed=11), rand(2, 700, 320, seed=12)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(native_avx2.attention_fp32(q, k, v, 8))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(native_avx2, name)
    monkeypatch.setattr(native_avx2, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_attention_dispatch(monkeypatch):
    calls = count_calls(monkeypatch, "attention_fp32")
    q = rand(2, 512, 320, seed=13)
    out = attention(q, q, q, 8)
    assert len(calls) == 1
    assert (out.double() - exact(q, q, q, 8)).abs().max() < 1e-5
    # SDPA for: bf16, causal, a head width not a multiple of 8 or above 160, too small a problem,
    # autograd, LATENTFORGE_KERNELS=off
    attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), 8)
    attention(q, q, q, 8, causal=True)
    attention(q, q, q, 10)  # 32 wide: taken
    assert len(calls) == 2
    attention(q[..., :300], q[..., :300], q[..., :300], 10)  # 30 wide
    wide = rand(1, 1100, 512, seed=17)
    attention(wide, wide, wide, 1)  # the VAE's 512-wide head
    small = rand(1, 16, 64, seed=14)
    attention(small, small, small, 2)
    leaf = q.clone().requires_grad_()
    attention(leaf, leaf, leaf, 8).sum().backward()
    assert leaf.grad is not None
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    attention(q, q, q, 8)
    assert len(calls) == 2


def test_auto_mode_follows_the_cpu(monkeypatch):
    monkeypatch.setenv("LATENTFORGE_KERNELS", "auto")
    native._state["flags"] = {"avx", "avx2", "fma"}  # AMD Zen 3: where they were measured
    assert native_avx2.wanted()
    native._state["flags"] = {"avx2", "fma", "avx512f"}  # PyTorch's own ops use 512-bit code there
    assert not native_avx2.wanted()
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    assert native_avx2.wanted()
    native._state["flags"] = {"sse4_2", "avx"}
    assert not native_avx2.wanted()


def test_a_failing_compiler_falls_back_to_pytorch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    native.reset()
    q = rand(2, 512, 320, seed=15)
    with caplog.at_level("WARNING"):
        out = attention(q, q, q, 8)
    assert "avx2 kernels are not available" in caplog.text and "/bin/false" in caplog.text
    assert torch.equal(out, sdpa(q, q, q, 8))
    assert not native_avx2.geglu_usable(q, rand(64, 320, seed=1), None)
    assert not list(tmp_path.rglob("*.so"))


def test_build_is_cached_per_library(tmp_path):
    first = native.build(tmp_path, library=native_avx2.AVX2)
    assert first.name.startswith("latentforge-avx2-")
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, library=native_avx2.AVX2) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


GEGLU_SHAPES = [((2, 1024, 320), 1280), ((2, 77, 64), 40), ((1, 65, 24), 7), ((3, 5, 2, 32), 12)]


@pytest.mark.parametrize("x_shape, features", GEGLU_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_geglu_matches_the_definition(x_shape, features, with_bias):
    c = x_shape[-1]
    x = rand(*x_shape, seed=1)
    weight = rand(2 * features, c, scale=c**-0.5, seed=2)
    bias = rand(2 * features, seed=3) if with_bias else None
    with torch.inference_mode():
        assert native_avx2.geglu_usable(x, weight, bias)
        ours = native_avx2.linear_geglu_fp32(x, weight, bias)
        plain = geglu_plain(x, weight, bias)
    assert ours.shape == (*x_shape[:-1], features) and ours.dtype == torch.float32
    ref = geglu_exact(x, weight, bias)
    err, err_plain = (ours.double() - ref).abs(), (plain.double() - ref).abs()
    assert err.max() <= 2 * err_plain.max() + 1e-6
    assert err.mean() <= 1.5 * err_plain.mean() + 1e-8


def test_geglu_of_large_gates_and_a_strided_input():
    """Gates far out in both tails (GELU -> 0 and -> the identity) and an input whose channels are not
    innermost."""
    x = rand(2, 40, 96, seed=4).transpose(1, 2) * 8  # (2, 96, 40)
    weight, bias = rand(64, 40, seed=5), rand(64, seed=6) * 20
    with torch.inference_mode():
        ours = native_avx2.linear_geglu_fp32(x, weight, bias)
    ref = geglu_exact(x, weight, bias)
    assert (ours.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_geglu_module_dispatch(monkeypatch):
    from latentforge.models.unet import GEGLU

    torch.manual_seed(0)
    mod = GEGLU(64, 96)
    x = rand(2, 300, 64, seed=10)
    monkeypatch.setattr(native_avx2, "MIN_GEGLU_ELEMENTS", 2 * 300 * 192 + 1)  # one element short
    assert not native_avx2.geglu_usable(x, mod.proj.weight, mod.proj.bias)
    monkeypatch.setattr(native_avx2, "MIN_GEGLU_ELEMENTS", 2 * 300 * 192)
    calls = count_calls(monkeypatch, "linear_geglu_fp32")
    with torch.inference_mode():
        ours = mod(x)
        assert len(calls) == 1
        ref = geglu_exact(x, mod.proj.weight, mod.proj.bias)
        plain = geglu_plain(x, mod.proj.weight, mod.proj.bias)
        assert (ours.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6
        handle = mod.proj.register_forward_hook(lambda m, i, o: o * 0)  # a hook: the plain path, hook honoured
        assert torch.equal(mod(x), torch.zeros_like(ours))
        handle.remove()
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        off = mod(x)
    assert len(calls) == 1
    assert torch.equal(off, geglu_plain(x, mod.proj.weight, mod.proj.bias))  # off: PyTorch's plain ops
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    y = mod(x.requires_grad_())  # autograd: PyTorch's ops
    y.sum().backward()
    assert mod.proj.weight.grad is not None and len(calls) == 1


def test_tiny_fp32_unet_same_as_with_pytorch_ops(monkeypatch, tmp_path):
    """A whole (tiny) fp32 UNet with every attention and GEGLU through the kernels gives the output of the
    same UNet on PyTorch's ops to fp32 rounding."""
    import latentforge
    from tiny import build_reference, save_folder

    monkeypatch.setattr(native_avx2, "MIN_SCORES", 0)
    pipe = latentforge.load(save_folder(build_reference("sd1"), tmp_path / "sd1"), dtype="fp32")
    unet = pipe.unet
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k")).in_features
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    attn, geglu = count_calls(monkeypatch, "attention_fp32"), count_calls(monkeypatch, "linear_geglu_fp32")
    with torch.inference_mode():
        ours = unet(x, t, ctx).double()
        assert attn and geglu
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        theirs = unet(x, t, ctx).double()
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


WINOGRAD_CASES = [(2, 32, 48, 16, 16, True), (1, 8, 16, 6, 10, False), (1, 16, 8, 2, 2, True), (3, 24, 40, 12, 4, True)]


@pytest.mark.parametrize("n,cin,cout,h,w,bias", WINOGRAD_CASES)
def test_winograd_transforms_match_the_pytorch_ops(monkeypatch, n, cin, cout, h, w, bias):
    """The fp32 Winograd convolution with its transforms in the kernels: the convolution (float64
    ``F.conv2d``) to fp32 rounding, and the same bits as the transforms in PyTorch ops (the same additions in
    the same order), in one band and in several."""
    from latentforge.nn import winograd

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(cout, cin, 3, 3, generator=g) * (cin * 9) ** -0.5
    b = torch.randn(cout, generator=g) if bias else None
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    assert native_avx2.winograd_usable(x, cout)
    calls = count_calls(monkeypatch, "winograd_input")
    ours = winograd.conv3x3_fp32(x, weight, b)
    assert calls and ours.is_contiguous(memory_format=torch.channels_last) and ours.shape == (n, cout, h, w)
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    assert ((ours.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 5e-6
    n_calls = len(calls)
    winograd.conv3x3_fp32(x, weight, b, wraps=True)  # circular padding: the PyTorch ops (not the kernels)
    assert len(calls) == n_calls
    monkeypatch.setattr(winograd, "_band_rows_fp32", lambda *shape: 1)  # one row of tiles per band
    assert torch.equal(winograd.conv3x3_fp32(x, weight, b), ours)
    assert len(calls) == n_calls + h // 2
    monkeypatch.setattr(native_avx2, "winograd_usable", lambda *a: False)
    assert torch.equal(winograd.conv3x3_fp32(x, weight, b), ours)


def group_norm_silu_conv_exact(x, norm, conv):
    """conv(silu(GroupNorm(x))) in float64: GroupNorm's definition (Wu & He 2018, biased variance over each
    group's channels and pixels), SiLU(y) = y sigmoid(y), the zero-padded 3x3 convolution."""
    n, c, h, w = x.shape
    xd = x.double().reshape(n, norm.num_groups, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + norm.eps)).reshape(n, c, h, w)
    y = y * norm.weight.double()[None, :, None, None] + norm.bias.double()[None, :, None, None]
    y = y * torch.sigmoid(y)
    return F.conv2d(y, conv.weight.double(), conv.bias.double(), padding=1)


def test_group_norm_affine_is_the_group_norm():
    from latentforge.nn import GroupNorm32

    g = torch.Generator().manual_seed(20)
    norm = GroupNorm32(8, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g)), norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(2, 64, 10, 6, generator=g) * 3 + 40).contiguous(memory_format=torch.channels_last)  # offset
    scale, shift = native_avx2.group_norm_affine(x, 8, norm.weight, norm.bias, 1e-6)
    ours = x * scale[:, :, None, None] + shift[:, :, None, None]
    xd = x.double().reshape(2, 8, -1)
    ref = ((xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)).reshape(
        x.shape
    ) * norm.weight.double()[None, :, None, None] + norm.bias.double()[None, :, None, None]
    torch_err = (F.group_norm(x, 8, norm.weight, norm.bias, 1e-6).double() - ref).abs().max()
    assert (ours.double() - ref).abs().max() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("n,c,cout,side", [(1, 128, 128, 32), (2, 256, 64, 12), (1, 128, 256, 34)])
def test_resblock_norm_silu_conv_fused_in_a_session(monkeypatch, n, c, cout, side):
    """``packed.norm_silu_conv`` inside a packed session: GroupNorm + SiLU applied by the Winograd input
    transform, the convolution to fp32 rounding (float64 reference), and the same result as the plain calls
    to within fp32 rounding; the plain calls with a hook, under autograd, with the kernels off."""
    from latentforge.nn import GroupNorm32, packed

    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "on")  # any map size
    g = torch.Generator().manual_seed(n * c + side)
    norm = GroupNorm32(32, c, eps=1e-6)
    conv = torch.nn.Conv2d(c, cout, 3, padding=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(c, generator=g)), norm.bias.copy_(torch.randn(c, generator=g))
    x = (torch.randn(n, c, side, side, generator=g) * 2 + 5).contiguous(memory_format=torch.channels_last)
    ref = group_norm_silu_conv_exact(x, norm, conv)
    model = torch.nn.ModuleDict({"norm": norm, "conv": conv})
    stats = count_calls(monkeypatch, "group_norm_affine")
    with torch.inference_mode():
        plain = conv(norm(x, silu=True))
        with packed.packed_session(model):
            ours = packed.norm_silu_conv(norm, conv, x)
            assert len(stats) == 1
            handle = norm.register_forward_hook(lambda m, i, o: o)
            hooked = packed.norm_silu_conv(norm, conv, x)
            handle.remove()
            monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
            off = packed.norm_silu_conv(norm, conv, x)
            monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
        outside = packed.norm_silu_conv(norm, conv, x)  # outside a session: the plain calls
    assert len(stats) == 1
    assert ours.shape == (n, cout, side, side) and ours.is_contiguous(memory_format=torch.channels_last)
    rel = ((ours.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 5e-6
    for other in (plain, hooked, off, outside):
        assert ((other.double() - ours.double()).abs().max() / ref.abs().max()).item() < 1e-5
    with torch.enable_grad():
        y = packed.norm_silu_conv(norm, conv, x.clone().requires_grad_())
        y.sum().backward()
    assert norm.weight.grad is not None and len(stats) == 1


def test_vae_decode_fused_matches_the_plain_path(monkeypatch):
    """A (small) VAE decode on the fast path with the ResBlocks' GroupNorm + SiLU fused into the Winograd
    input transforms against the same decode with the kernels off."""
    from latentforge.device import to_fast_layout
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL

    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "on")
    cfg = dataclasses.replace(get_family("sd1").vae, base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    torch.manual_seed(0)
    vae = to_fast_layout(AutoencoderKL(cfg).float().eval())
    z = torch.randn(1, 4, 8, 8)
    stats = count_calls(monkeypatch, "group_norm_affine")
    from latentforge.nn import packed

    with torch.inference_mode():
        with packed.packed_session(vae):
            ours = vae.decode(z)
        assert stats
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        plain = vae.decode(z)
    assert (ours - plain).abs().max() <= 1e-4 * plain.abs().max()
