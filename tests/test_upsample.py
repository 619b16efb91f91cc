"""nn/upsample.py: nearest 2x + 3x3 convolution as four 2x2 convolutions of the input, against the
doubled map convolved in float64 by PyTorch, and the cases that must keep the plain path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from latentforge.nn import upsample
from latentforge.nn.upsample import upsample_conv


def reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(up, conv.weight.double(), bias, padding=1)


@pytest.fixture(autouse=True)
def small_maps(monkeypatch):
    monkeypatch.setattr(upsample, "MIN_PIXELS", 0)  # the tests' maps are small
    monkeypatch.setenv("LATENTFORGE_KERNELS", "auto")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(("n", "c", "cout", "h", "w", "bias"), [(1, 8, 8, 5, 7, True), (2, 6, 10, 4, 4, False)])
def test_matches_the_doubled_map_convolved(channels_last, n, c, cout, h, w, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, cout, 3, padding=1, bias=bias)
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert upsample.usable(x, conv)
        out = upsample_conv(x, conv)
    ref = reference(x, conv)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_changed_weight_gives_new_kernels():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        upsample_conv(x, conv)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place, as adapters patch weights
        out = upsample_conv(x, conv)
    assert torch.allclose(out.double(), reference(x, conv), rtol=1e-5, atol=1e-5)


def test_plain_path_for_hooks_sizes_dtypes_padding_and_autograd(monkeypatch):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    handle = conv.register_forward_hook(lambda m, a, out: out + 1.0)  # an adapter's hook must still run
    with torch.inference_mode():
        assert torch.allclose(upsample_conv(x, conv).double(), reference(x, conv) + 1.0, atol=1e-5)
    handle.remove()
    with torch.inference_mode():  # a size that is not an exact doubling (the UNet's odd latents)
        out = upsample_conv(x, conv, size=(11, 12))
        plain = conv(F.interpolate(x, size=(11, 12), mode="nearest"))
    assert out.shape == (1, 4, 11, 12) and torch.equal(out, plain)
    assert not upsample.usable(x.double(), copy.deepcopy(conv).double())
    assert not upsample.usable(x.bfloat16(), copy.deepcopy(conv).bfloat16())
    circular = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
    assert not upsample.usable(x, circular)
    assert not upsample.usable(x, torch.nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not upsample.usable(x, conv)  # autograd: parameters need gradients
    y = upsample_conv(x, conv)
    y.sum().backward()
    assert conv.weight.grad is not None
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    with torch.inference_mode():
        assert not upsample.usable(x, conv)
    monkeypatch.setattr(upsample, "MIN_PIXELS", 1024)
    monkeypatch.setenv("LATENTFORGE_KERNELS", "auto")
    with torch.inference_mode():
        assert not upsample.usable(x, conv) and upsample.usable(torch.randn(1, 4, 32, 32), conv)


def test_vae_decoder_and_unet_upsample_the_same_as_the_plain_path(monkeypatch):
    from latentforge.models import AutoencoderKL
    from latentforge.models.unet import Upsample
    from latentforge.models.vae import VAEConfig

    torch.manual_seed(3)
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)).eval()
    z = torch.randn(1, 4, 8, 8)
    up = Upsample(16).eval()
    h = torch.randn(2, 16, 5, 6).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast, fast_up = vae.decode(z), up(h, (10, 12))
        monkeypatch.setenv("LATENTFORGE_KERNELS", "off")  # PyTorch's interpolate + conv
        plain, plain_up = vae.decode(z), up(h, (10, 12))
    # the same numbers up to the order of additions: close, and not the very same path
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5) and not torch.equal(fast, plain)
    assert torch.allclose(fast_up, plain_up, rtol=1e-5, atol=1e-5) and not torch.equal(fast_up, plain_up)


def test_weights_made_under_inference_mode():
    """Inference tensors have no version counter (an fp32 copy of a VAE made while generating): the
    kernels are made from the weight each call, so an in-place change is still seen."""
    torch.manual_seed(4)
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        assert conv.weight.is_inference()
        first = upsample_conv(x, conv)
        assert torch.allclose(first.double(), reference(x, conv), rtol=1e-5, atol=1e-5)
        conv.weight.mul_(0.5)
        second = upsample_conv(x, conv)
        assert torch.allclose(second.double(), reference(x, conv), rtol=1e-5, atol=1e-5)
