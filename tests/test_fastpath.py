"""The fast path: automatic dtype, offload hooks, tiled VAE decode/encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge import device as dev
from latentforge.families import get_family
from latentforge.train.shapes import Scene, render
from tiny import build_reference, save_folder


def test_auto_dtype_rules(monkeypatch):
    monkeypatch.delenv("LATENTFORGE_DTYPE", raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    assert dev.auto_dtype(cpu, 860_000_000)[0] == torch.bfloat16
    assert dev.auto_dtype(cpu, 2_000_000)[0] == torch.float32  # small models: overhead-bound
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)
    assert dev.auto_dtype(cpu, 860_000_000)[0] == torch.float32
    monkeypatch.setenv("LATENTFORGE_DTYPE", "bf16")
    dtype, why = dev.auto_dtype(cpu, 10)
    assert dtype == torch.bfloat16 and "LATENTFORGE_DTYPE" in why
    assert dev.vae_dtype(torch.float16, get_family("sdxl-base").vae_fp16_safe, cpu) in (torch.bfloat16, torch.float32)
    assert dev.vae_dtype(torch.float16, get_family("sd1").vae_fp16_safe, cpu) == torch.float16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_folder(build_reference("sd1", seed=60), tmp_path_factory.mktemp("fp") / "m")


def test_values_reach_the_device_without_a_copy_when_equal(monkeypatch):
    """``device.filled``: a batch of equal sigmas becomes a fill on the device (no host-to-device copy,
    which would make the host wait for the GPU), unequal ones are copied; the float32 values are those of
    a plain conversion either way."""
    copies = []
    monkeypatch.setattr(dev, "to_device", lambda t, d, dtype=None: copies.append(t) or t.to(d, dtype))
    meta = torch.device("meta")  # a device other than the CPU that needs no hardware
    same = torch.full((3,), 14.614641189575195, dtype=torch.float64)
    out = dev.filled(same, meta)
    assert copies == [] and out.device == meta and out.dtype == torch.float32 and out.shape == (3,)
    mixed = torch.tensor([1.5, 0.25], dtype=torch.float64)
    assert dev.filled(mixed, meta).shape == (2,) and len(copies) == 1
    cpu = torch.device("cpu")
    for values in (same, mixed):
        assert torch.equal(dev.filled(values, cpu), values.to(torch.float32))


def test_load_reports_the_dtype_decision(tiny, monkeypatch):
    monkeypatch.delenv("LATENTFORGE_DTYPE", raising=False)
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(dev, "AUTO_BF16_MIN_UNET_PARAMS", 1)
    pipe = latentforge.load(tiny)
    assert pipe.dtype == torch.bfloat16 and "bf16" in pipe.info.dtype_reason
    pipe = latentforge.load(tiny, dtype="fp32")
    assert pipe.dtype == torch.float32 and "explicit" in pipe.info.dtype_reason


def _psnr(a, b) -> float:
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.mark.parametrize("sequential", [False, True])
def test_offload_hooks_give_the_same_image(tiny, sequential):
    pipe = latentforge.load(tiny)
    reference = pipe.txt2img("a cube", seed=4, steps=4, width=64, height=64).images[0]
    offloader = pipe.enable_offload("cpu", sequential=sequential)
    again = pipe.txt2img("a cube", seed=4, steps=4, width=64, height=64).images[0]
    assert np.array_equal(np.asarray(reference), np.asarray(again))
    assert offloader.moves > (10 if sequential else 1)
    offloader.remove()


def test_compiled_unet_gives_the_same_image_and_the_module_still_saves(tiny, tmp_path, monkeypatch):
    # backend "eager": dynamo traces the UNet (the part that can break) without minutes of inductor codegen.
    # A compiled graph runs PyTorch's ops where eager calls latentforge's kernels (ctypes calls cannot be
    # traced; nn/native.py): the eager reference takes PyTorch's ops too
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")
    pipe = latentforge.load(tiny)
    reference = pipe.txt2img("a cube", seed=4, steps=3, width=64, height=64).images[0]
    pipe.compile(backend="eager")
    again = pipe.txt2img("a cube", seed=4, steps=3, width=64, height=64).images[0]
    assert np.array_equal(np.asarray(reference), np.asarray(again))
    pipe.save(tmp_path / "compiled.safetensors")
    assert latentforge.load(tmp_path / "compiled.safetensors").family.name == "sd1"


@pytest.fixture(scope="module")
def demo_vae():
    from latentforge.demo import bundled_model_path

    return latentforge.load(bundled_model_path(), dtype="fp32").vae


def _big_scene() -> torch.Tensor:
    from latentforge.pipelines.images import image_to_tensor

    big = render(Scene("red", "circle", "blue", "large", "in the center", ""), resolution=256)
    return image_to_tensor(big)


def test_tiled_decode_and_encode_match_whole_image_without_seams(demo_vae):
    x = _big_scene()
    with torch.no_grad():
        z = demo_vae.encode(x, tile=0)
        whole = demo_vae.decode(z, tile=0)
        tiled = demo_vae.decode(z, tile=24)  # the 64x64 latent in 24-pixel tiles overlapping by 6
        z_tiled = demo_vae.encode(x, tile=24)
    to_img = latentforge.pipelines.images.tensor_to_images
    assert _psnr(to_img(tiled)[0], to_img(whole)[0]) > 32
    assert float((z_tiled - z).abs().max()) < 0.25 * float(z.abs().max())
    # no edge: the image change across each tile boundary is no larger than across its neighbours
    diff = (tiled - whole).abs().mean(dim=(0, 1))  # (H, W)
    col = diff.mean(dim=0)
    assert float(col.max()) < 5 * float(col.mean()) + 1e-3


def test_bf16_group_norm_equals_the_fp32_computation(monkeypatch):
    from latentforge.nn import GroupNorm32

    norm = GroupNorm32(8, 64, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 32, 32) * 3 + 1).bfloat16().to(memory_format=torch.channels_last)
    exact = torch.nn.functional.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), 1e-6)
    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")  # PyTorch's bf16 kernel: bit for bit the upcast result
    assert torch.equal(norm(x), exact.bfloat16())
    # latentforge's own kernel (AVX512-BF16 CPUs): fp32/double statistics too, within one bf16 rounding
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    assert ((norm(x).float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_in_place_silu_and_residual_adds_keep_values_and_gradients():
    """GroupNorm32's SiLU and the VAE blocks' residual adds write into their own fresh outputs when no
    gradient is needed; the values must be the plain formulas', and under autograd the gradients too."""
    from latentforge.models import AutoencoderKL
    from latentforge.models.vae import ResnetBlock
    from latentforge.nn import GroupNorm32

    F = torch.nn.functional
    torch.manual_seed(3)
    norm = GroupNorm32(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 8, 8)
    plain = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))
    with torch.inference_mode():
        assert torch.allclose(norm(x, silu=True), plain, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    norm(xg, silu=True).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    F.silu(F.group_norm(xr, 4, norm.weight, norm.bias, 1e-6)).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, atol=1e-5)

    cfg = get_family("sd1").vae
    block = ResnetBlock(cfg, 32, 64).eval()  # with a 1x1 shortcut
    x = torch.randn(1, 32, 8, 8)

    def by_hand(x):
        h = block.conv1(F.silu(F.group_norm(x, cfg.norm_groups, block.norm1.weight, block.norm1.bias, 1e-6)))
        h = block.conv2(F.silu(F.group_norm(h, cfg.norm_groups, block.norm2.weight, block.norm2.bias, 1e-6)))
        return block.nin_shortcut(x) + h

    with torch.inference_mode():
        assert torch.allclose(block(x), by_hand(x), atol=1e-5)
    y = block(x)  # under autograd: the plain additions, gradients reach the weights
    y.square().sum().backward()
    ours = block.conv1.weight.grad.clone()
    block.zero_grad()
    by_hand(x).square().sum().backward()
    assert torch.allclose(ours, block.conv1.weight.grad, rtol=1e-4, atol=1e-6)

    vae = AutoencoderKL(cfg).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        fast = vae.decode(z)
    plain = vae.decode(z)  # parameters needing gradients: the plain additions and SiLU
    assert plain.requires_grad and torch.isfinite(fast).all()
    # outputs about 2 at most; the no-grad decode of this full-size-width VAE runs its packed session
    # (oneDNN's packed weights, fp32 Winograd: other summation orders, differences about 1e-5)
    assert torch.allclose(fast, plain.detach(), atol=1e-4)


def _record_compiles(monkeypatch) -> list[dict]:
    """torch.compile as latentforge calls it, recorded, traced with the "eager" backend (no minutes of
    inductor code generation); the options it was given are what the tests look at."""
    from latentforge.adapters import patcher

    calls, real = [], torch.compile

    def recording(fn, **options):
        calls.append(options)
        return real(fn, backend="eager")

    monkeypatch.setattr(patcher.torch, "compile", recording)
    return calls


def test_cli_compile_flag_compiles_the_unet_and_keeps_the_image(tiny, tmp_path, monkeypatch):
    from latentforge.cli import main

    monkeypatch.setenv("LATENTFORGE_KERNELS", "off")  # compiled graphs run PyTorch's ops (see above)
    args = ["txt2img", "a cube", "-m", str(tiny), "-W", "64", "-H", "64", "--steps", "2", "--seed", "5", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    calls = _record_compiles(monkeypatch)
    assert main([*args, "--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    assert calls == [{}]  # torch's default mode on the CPU: CUDA graphs only on a CUDA device
    plain, compiled = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "compiled"))
    assert np.array_equal(plain, compiled)


def test_compile_defaults_to_cuda_graphs_on_a_cuda_device(tiny, monkeypatch):
    from latentforge.pipeline import Pipeline

    calls = _record_compiles(monkeypatch)
    pipe = latentforge.load(tiny)
    monkeypatch.setattr(Pipeline, "device", property(lambda self: torch.device("cuda")))
    pipe.compile()
    pipe.compile(mode="default")  # given options are kept as they are
    assert calls == [{"mode": "reduce-overhead"}, {"mode": "default"}]


def test_server_compile_setting_compiles_each_loaded_model(tiny, monkeypatch):
    from latentforge.server.config import ServerConfig
    from latentforge.server.models import ModelCache, ModelCatalog

    calls = _record_compiles(monkeypatch)
    compiled = ModelCache(ModelCatalog(tiny, None), ServerConfig(compile=True)).get(tiny.name)
    plain = ModelCache(ModelCatalog(tiny, None), ServerConfig()).get(tiny.name)
    assert compiled.patcher.compiled == ["unet"] and plain.patcher.compiled == [] and calls == [{}]
