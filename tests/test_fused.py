"""GEGLU with its GELU and product as post-ops of oneDNN matmuls (nn/fused.py), against the definition
computed here in float64: value * gelu(gate), [value, gate] = x W^T + b, GELU from erf (Hendrycks &
Gimpel 2016); PyTorch's plain bf16 ops are the yardstick of bf16 accuracy. And the module's dispatch."""

from __future__ import annotations

import pytest
import torch

from attention_ref import geglu_exact, geglu_plain
from latentforge.nn import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs oneDNN with bf16 on this CPU")


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


@pytest.mark.parametrize(
    "x_shape, features",
    [((2, 4096, 320), 1280), ((2, 77, 64), 40), ((1, 65, 24), 7), ((33, 48), 16), ((3, 5, 2, 32), 24)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_geglu_matches_the_definition(x_shape, features, with_bias):
    c = x_shape[-1]
    x = rand(*x_shape, seed=1)
    weight = rand(2 * features, c, seed=2, scale=c**-0.5)
    bias = rand(2 * features, seed=3, scale=0.5) if with_bias else None
    with torch.inference_mode():
        assert fused.linear_geglu_usable(x, weight, bias)
        ours = fused.linear_geglu(x, weight, bias)
        ref = geglu_exact(x, weight, bias)
        err, err_plain = (ours.double() - ref).abs(), (geglu_plain(x, weight, bias).double() - ref).abs()
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    # one rounding of the fp32 accumulator instead of roundings before the bias and the GELU
    assert err.max() <= err_plain.max() + 1e-6
    assert err.mean() <= err_plain.mean() + 1e-7


def test_strided_input_gives_the_same_result():
    x = rand(2, 40, 96, seed=4).transpose(1, 2)  # (2, 96, 40), channels not innermost
    weight, bias = rand(64, 40, seed=5, scale=0.2), rand(64, seed=6)
    with torch.inference_mode():
        ours = fused.linear_geglu(x, weight, bias)
        dense = fused.linear_geglu(x.contiguous(), weight, bias)
    assert torch.allclose(ours.float(), dense.float(), atol=2e-2, rtol=1e-2)
    ref = geglu_exact(x, weight, bias)
    assert (ours.double() - ref).abs().max() <= (geglu_plain(x, weight, bias).double() - ref).abs().max() + 1e-6


def test_not_usable_where_it_must_not_run():
    x, weight = rand(4, 8, seed=7), rand(12, 8, seed=8)
    assert not fused.linear_geglu_usable(x.float(), weight.float(), None)  # fp32: PyTorch's ops
    assert not fused.linear_geglu_usable(x, rand(11, 8, seed=9), None)  # odd width: no value/gate split
    assert not fused.linear_geglu_usable(x, rand(12, 9, seed=9), None)  # width mismatch: F.linear's error
    assert not fused.linear_geglu_usable(x, weight, torch.zeros(12))  # fp32 bias
    with torch.enable_grad():
        assert not fused.linear_geglu_usable(x.requires_grad_(), weight, None)  # autograd


def test_geglu_module_dispatch(monkeypatch):
    from latentforge.models.unet import GEGLU

    torch.manual_seed(0)
    mod = GEGLU(64, 96).to(torch.bfloat16)
    x = rand(2, 300, 64, seed=10)
    calls = []
    real = fused.linear_geglu
    monkeypatch.setattr(fused, "linear_geglu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("LATENTFORGE_KERNELS", raising=False)
    with torch.inference_mode():
        ours = mod(x)
        assert len(calls) == 1
        ref = geglu_exact(x, mod.proj.weight, mod.proj.bias)
        plain = geglu_plain(x, mod.proj.weight, mod.proj.bias)
        assert (ours.double() - ref).abs().max() <= (plain.double() - ref).abs().max()
        handle = mod.proj.register_forward_hook(lambda m, i, o: o * 0)  # a hook: the plain path, hook honoured
        assert torch.equal(mod(x), torch.zeros_like(ours))
        handle.remove()
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
        off = mod(x)
    assert len(calls) == 1
    assert torch.equal(off, geglu_plain(x, mod.proj.weight, mod.proj.bias))  # off: PyTorch's plain ops
    monkeypatch.delenv("LATENTFORGE_KERNELS")
    y = mod(x.requires_grad_())  # autograd: PyTorch's ops
    y.float().sum().backward()
    assert mod.proj.weight.grad is not None and len(calls) == 1
