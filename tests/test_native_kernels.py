"""latentforge's bf16 CPU kernels (nn/native.py, nn/kernels/*.cpp). Attention against the formula computed
here in float64, softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), with PyTorch's SDPA as the
yardstick of bf16 accuracy; GroupNorm (+ SiLU) against its definition in float64; the dispatch and the
fallbacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attention_ref import exact, sdpa
from latentforge.nn import native as fa
from latentforge.nn.attention import attention

HAS_BF16 = "avx512_bf16" in fa._cpu_flags()
pytestmark = pytest.mark.skipif(not HAS_BF16 or fa._compiler() is None, reason="needs AVX512-BF16 and a C++ compiler")


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch, tmp_path_factory):
    """The kernels forced on (also on AMX CPUs), built once into a test cache folder."""
    cache = tmp_path_factory.getbasetemp() / "kernel-cache"
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(cache))
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    fa.reset()
    yield
    fa.reset()


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


SHAPES = [
    # (batch, queries, keys, heads, head width): SD's shapes and awkward ones (odd counts, partial blocks)
    (2, 4096, 4096, 8, 40),  # SD1.5 UNet, first level at 512 px
    (2, 1024, 77, 8, 80),  # cross-attention
    (1, 1024, 1024, 1, 512),  # the VAE's mid-block attention
    (2, 256, 256, 10, 64),  # SDXL/SD2 head width
    (2, 64, 64, 8, 160),
    (3, 333, 517, 3, 6),  # neither queries nor keys a multiple of the blocks (64 x 256), odd keys
    (1, 1, 300, 2, 2),
    (1, 70, 1, 4, 24),
]


@pytest.mark.parametrize("b,nq,nk,heads,d", SHAPES)
def test_matches_the_formula_as_well_as_sdpa(b, nq, nk, heads, d):
    c = heads * d
    q, k, v = rand(b, nq, c, seed=1), rand(b, nk, c, seed=2), rand(b, nk, c, seed=3)
    ref = exact(q, k, v, heads)
    ours = fa.attention_bf16(q, k, v, heads)
    assert ours.dtype == torch.bfloat16 and ours.shape == (b, nq, c)
    err = (ours.double() - ref).abs()
    err_sdpa = (sdpa(q, k, v, heads).double() - ref).abs()
    # bf16 output rounding dominates both: ours may not be worse than PyTorch's kernel
    assert err.max() <= 1.5 * err_sdpa.max() + 1e-3
    assert err.mean() <= 1.5 * err_sdpa.mean() + 1e-5


def test_strided_inputs_and_broadcast_batch():
    """q, k, v as slices of one fused projection, and keys/values expanded over the batch (stride 0)."""
    heads, d, n = 4, 40, 300
    fused = rand(2, n, 3 * heads * d, seed=4)
    q, k, v = fused.split(heads * d, dim=-1)
    ours = fa.attention_bf16(q, k, v, heads)
    assert (ours.double() - exact(q, k, v, heads)).abs().max() < 2e-2
    ctx_k, ctx_v = rand(1, 77, heads * d, seed=5).expand(2, -1, -1), rand(1, 77, heads * d, seed=6).expand(2, -1, -1)
    ours = fa.attention_bf16(q, ctx_k, ctx_v, heads)
    assert (ours.double() - exact(q, ctx_k, ctx_v, heads)).abs().max() < 2e-2


def test_online_softmax_finds_a_late_maximum():
    """Large scores whose maximum sits in the last block of keys: the running maximum and the rescaling
    of the accumulated output must give that key's value (the formula: one weight near 1)."""
    heads, d, nk = 1, 40, 1000
    base = rand(1, 1, d, seed=6).float()
    q = (base + rand(1, 64, d, scale=0.1, seed=7).float()).bfloat16()
    k = rand(1, nk, d, seed=8).clone()
    k[0, nk - 3] = (base[0, 0] * 3).bfloat16()  # aligned with every query (score ~ 3 |base|^2), 4th block
    v = rand(1, nk, d, seed=9)
    ours = fa.attention_bf16(q, k, v, heads).double()
    ref = exact(q, k, v, heads)
    assert (ours - ref).abs().max() < 2e-2
    assert (ref[0] - v[0, nk - 3].double()).abs().max() < 0.05  # the case really is dominated by that key


@pytest.mark.parametrize("nk", [77, 517])
def test_all_scores_far_below_zero_with_a_partial_group_of_keys(nk):
    """Every score near -100 and a key count that leaves a partial group of 16: the zero-padded key lanes
    must not count as the row's maximum (a maximum of 0 would underflow every probability and give the
    mean of V instead of the softmax)."""
    heads, d = 2, 40
    base = rand(1, 1, heads * d, seed=13).float()
    q = (4 * base + rand(1, 50, heads * d, scale=0.3, seed=14).float()).bfloat16()
    k = (-4 * base + rand(1, nk, heads * d, scale=0.3, seed=15).float()).bfloat16()
    v = rand(1, nk, heads * d, seed=16)
    ref = exact(q, k, v, heads)
    qq, kk = (t.double().reshape(1, -1, heads, d).transpose(1, 2) for t in (q, k))
    assert (qq @ kk.transpose(-1, -2) / math.sqrt(d)).max() < -60  # the case really is far below zero
    ours = fa.attention_bf16(q, k, v, heads).double()
    assert (ours - ref).abs().max() < 2e-2


def test_same_result_with_any_thread_count():
    q, k, v = rand(2, 700, 320, seed=10), rand(2, 700, 320, seed=11), rand(2, 700, 320, seed=12)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fa.attention_bf16(q, k, v, 8))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def count_kernel_calls(monkeypatch):
    calls = []
    real = fa.attention_bf16

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fa, "attention_bf16", counting)
    return calls


def test_attention_dispatch(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    q = rand(2, 512, 320, seed=13)
    out = attention(q, q, q, 8)
    assert len(calls) == 1
    assert (out.double() - exact(q, q, q, 8)).abs().max() < 2e-2
    # SDPA for: fp32, causal, upcast, too small a problem, autograd, LATENTFORGE_KERNELS=off
    attention(q.float(), q.float(), q.float(), 8)
    attention(q, q, q, 8, causal=True)
    attention(q, q, q, 8, upcast=True)
    small = rand(1, 16, 64, seed=14)
    attention(small, small, small, 2)
    leaf = q.clone().requires_grad_()
    attention(leaf, leaf, leaf, 8).float().sum().backward()
    assert leaf.grad is not None
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    attention(q, q, q, 8)
    assert len(calls) == 1


def test_auto_mode_follows_the_cpu(monkeypatch):
    monkeypatch.setenv("LATENTFORGE_KERNELS", "auto")
    fa._state["flags"] = {"avx512f", "avx512_bf16"}
    assert fa.wanted()
    fa._state["flags"] = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # PyTorch's kernel uses AMX
    assert not fa.wanted()
    fa._state["flags"] = {"avx2", "fma"}
    assert not fa.wanted()
    monkeypatch.setenv("LATENTFORGE_KERNELS", "fast please")
    with pytest.raises(ValueError, match=r"LATENTFORGE_KERNELS.*auto, off or on"):
        fa.wanted()


def test_a_failing_compiler_falls_back_to_sdpa(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    fa.reset()
    q = rand(2, 512, 320, seed=15)
    with caplog.at_level("WARNING"):
        out = attention(q, q, q, 8)
    assert "not available" in caplog.text and "/bin/false" in caplog.text
    assert torch.equal(out, sdpa(q, q, q, 8))
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


def test_build_is_cached_and_atomic(tmp_path):
    first = fa.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert fa.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_tiny_bf16_unet_as_close_as_with_sdpa(monkeypatch, tmp_path):
    """A whole (tiny) UNet in bf16 with every attention through the kernel stays as close to the fp32
    model as the same UNet on SDPA."""
    import latentforge
    from tiny import build_reference, save_folder

    monkeypatch.setattr(fa, "MIN_SCORES", 0)
    pipe = latentforge.load(save_folder(build_reference("sd1"), tmp_path / "sd1"), dtype="fp32")
    unet = pipe.unet
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k")).in_features
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.inference_mode():
        ref = unet(x, t, ctx).double()
        unet.to(torch.bfloat16)
        calls = count_kernel_calls(monkeypatch)
        ours = unet(x.bfloat16(), t, ctx.bfloat16()).double()
        assert calls
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        theirs = unet(x.bfloat16(), t, ctx.bfloat16()).double()
    assert (ours - ref).abs().mean() <= 1.5 * (theirs - ref).abs().mean() + 1e-4


def group_norm_exact(x, groups, weight, bias, eps, silu):
    """GroupNorm's definition (Wu & He 2018) in float64: biased variance over each group's channels and
    all pixels, then the per-channel affine; SiLU(y) = y * sigmoid(y)."""
    n, c, h, w = x.shape
    xd = x.double().reshape(n, groups, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    if weight is not None:
        y = y * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize(
    "shape,groups,offset",
    [((1, 128, 64, 64), 32, 0.0), ((2, 320, 8, 8), 32, 0.0), ((1, 960, 5, 7), 32, 3.0), ((2, 40, 3, 3), 8, 50.0)],
)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_the_definition(shape, groups, offset, silu, affine):
    x = (rand(*shape, scale=2.0, seed=30).float() + offset).bfloat16().contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias = (rand(c, seed=31), rand(c, seed=32)) if affine else (None, None)
    ref = group_norm_exact(x, groups, weight, bias, 1e-6, silu)
    ours = fa.group_norm_bf16(x, groups, weight, bias, 1e-6, silu=silu)
    torch_path = F.group_norm(x, groups, weight, bias, 1e-6)
    torch_path = F.silu(torch_path) if silu else torch_path
    assert ours.shape == x.shape and ours.is_contiguous(memory_format=torch.channels_last)
    err, err_torch = (ours.double() - ref).abs(), (torch_path.double() - ref).abs()
    assert err.max() <= err_torch.max() + 1e-6
    assert err.mean() <= err_torch.mean() + 1e-7


def test_group_norm_module_dispatch(monkeypatch):
    from latentforge.nn import GroupNorm32

    norm = GroupNorm32(8, 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
        norm.bias.copy_(torch.randn(64))
    calls = []
    real = fa.group_norm_bf16
    monkeypatch.setattr(fa, "group_norm_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    x32 = torch.randn(2, 64, 16, 16)
    with torch.inference_mode():
        # fp32: exactly PyTorch's ops as before, with and without the SiLU
        assert torch.equal(norm(x32, silu=True), F.silu(F.group_norm(x32, 8, norm.weight, norm.bias, 1e-5)))
        norm.to(torch.bfloat16)
        xb = x32.bfloat16().contiguous(memory_format=torch.channels_last)
        ours = norm(xb, silu=True)
        assert len(calls) == 1
        ref = group_norm_exact(xb, 8, norm.weight, norm.bias, 1e-5, True)
        assert (ours.double() - ref).abs().max() < 0.05
        norm(xb.contiguous())  # NCHW memory: PyTorch's kernel
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        norm(xb)
    assert len(calls) == 1


def _libgomp_mappings() -> set[str]:
    return {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}


def test_kernels_run_on_torchs_own_openmp_threads(tmp_path):
    """With g++ the kernels are built with OpenMP and share the libgomp torch loaded: one runtime and one
    pool of threads, not a second OpenMP runtime nor threads started per call."""
    if "g++" not in Path(fa._compiler()).name:
        pytest.skip("the OpenMP build is checked with g++ (libgomp ships with it)")
    plain = fa.build(tmp_path, openmp=False)  # a plain build in the cache does not shadow the OpenMP one
    assert fa.build(tmp_path) != plain
    assert fa.runtime() == "openmp"
    torch_gomp = {p for p in _libgomp_mappings() if Path(p).parent == Path(torch.__file__).parent / "lib"}
    assert torch_gomp, "this PyTorch build is expected to bring its own libgomp"
    assert _libgomp_mappings() == torch_gomp  # the kernels' library did not load the system's copy


def test_either_runtime_gives_the_same_bits(monkeypatch, tmp_path):
    """The fallback build (threads started per call, chosen where the compiler refuses OpenMP) computes the
    same outputs as the OpenMP build: tasks are split the same way and each runs on one thread."""
    from latentforge.nn import winograd

    q, k, v = rand(2, 700, 320, seed=40), rand(2, 513, 320, seed=41), rand(2, 513, 320, seed=42)
    x = rand(2, 64, 24, 20, seed=43).contiguous(memory_format=torch.channels_last)
    w, bias = rand(96, 64, 3, 3, scale=0.05, seed=44), rand(96, seed=45).float()
    u = winograd.transform(w)

    def outputs():
        return [
            fa.attention_bf16(q, k, v, 8),
            fa.group_norm_bf16(x, 8, None, None, 1e-6, silu=True),
            winograd.conv3x3(x, u, bias, 96),
        ]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fa.runtime() == "openmp" or "g++" not in Path(fa._compiler()).name
        with_openmp = outputs()
        monkeypatch.setattr(fa, "OPENMP_FLAGS", ["-fno-such-openmp-flag"])  # a compiler without OpenMP
        fa.reset()
        monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path))
        assert fa.runtime() == "threads"
        assert len(list((tmp_path / "kernels").glob("*.so"))) == 1  # the failed OpenMP build left nothing
        with_threads = outputs()
        compiles = []
        real_compile = fa._compile
        monkeypatch.setattr(fa, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
        fa.reset()
        assert fa.runtime() == "threads" and not compiles  # the refusal was remembered: no second try
    finally:
        torch.set_num_threads(before)
    for a, b in zip(with_openmp, with_threads):
        assert torch.equal(a, b)
