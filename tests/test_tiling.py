"""Tiling (A1111's seamless, tileable images): the UNet's and VAE's convolutions pad circularly while a
generation runs (latentforge.nn.circular), on every convolution path (PyTorch's, oneDNN's packed weights,
Winograd), with the VAE's tiles going round the edges (nn/tiling.py).

References: diffusers' UNet and VAE with the same weights and every ``nn.Conv2d`` set to
``padding_mode="circular"`` (what A1111's ``apply_circular`` does to its model); PyTorch's own circular
convolution; and a property that holds only with circular padding: convolutions that pad circularly commute
with circular shifts, so the UNet's output of a shifted latent (by multiples of its downsampling) is the
shifted output, and the decoded image of a shifted latent is the shifted image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentforge
from latentforge.nn import native, packed, winograd
from latentforge.nn.circular import circular_padding, is_circular
from latentforge.nn.tiling import tiled_apply, wrapped_starts
from latentforge.pipelines import GenerationRequest
from latentforge.pipelines.infotext_fields import infotext_params
from latentforge.pipelines.metadata import request_from_image, request_from_infotext
from tiny import build_reference, close, save_folder

HAS_WINOGRAD = "avx512_bf16" in native._cpu_flags() and native._compiler() is not None
needs_packing = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN ops")


def convs(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def modes(*modules) -> set[str]:
    return {m.padding_mode for module in modules for m in convs(module)}


@pytest.fixture
def kernels(forced_kernels):
    """latentforge's kernels forced on and Winograd at every map size (conftest.py)."""
    yield


# ----- the switch ------------------------------------------------------------------------------------------


def test_switch_makes_padding_convolutions_circular_and_restores_them_also_after_an_error():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 4, 3))
    other = torch.nn.Conv2d(4, 4, 3, padding=1)
    with circular_padding(True, net) as switch:
        assert [m.padding_mode for m in net] == ["circular", "zeros", "zeros"]  # padding 0: the same either way
        assert is_circular(net) and not is_circular(other)
        switch.add(other, None)  # networks loaded inside the block (a refiner)
        assert other.padding_mode == "circular"
    assert modes(net, other) == {"zeros"} and not is_circular(net)
    with pytest.raises(RuntimeError, match="boom"), circular_padding(True, net):
        raise RuntimeError("boom")
    assert modes(net) == {"zeros"}
    with circular_padding(False, net) as switch:
        switch.add(other)
        assert modes(net, other) == {"zeros"}
    net[0].padding_mode = "reflect"  # a mode set by someone else comes back as it was
    with circular_padding(True, net):
        assert net[0].padding_mode == "circular"
    assert net[0].padding_mode == "reflect"


# ----- the fast convolution paths ----------------------------------------------------------------------------

CASES = [  # cin, cout, kernel, stride, padding, groups
    (8, 16, 3, 1, 1, 1),
    (8, 8, 3, 2, 1, 1),
    (8, 16, 3, 1, 1, 4),
    (8, 8, 5, 1, 2, 1),
]


@needs_packing
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolution_pads_circularly(case, channels_last):
    cin, cout, k, stride, padding, groups = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups)
    x = torch.randn(2, cin, 12, 10)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    exact = F.conv2d(F.pad(x.double(), (padding,) * 4, mode="circular"), conv.weight.double(), conv.bias.double(),
                     stride=stride, groups=groups)  # fmt: skip
    with torch.inference_mode(), packed.packed_session(conv):
        zeros = conv(x)
        with circular_padding(True, conv):
            wrapped = conv(x)
            assert conv.weight.numel() == 0  # the packed path ran (the plain weight swapped out)
            assert packed._CACHE[conv]["shape"][-2:] == (0, 0)  # packed for the padded input, padding 0
        again = conv(x)  # zeros again: packed for that problem again
    torch.testing.assert_close(wrapped.double(), exact, rtol=1e-5, atol=1e-5)
    cl = torch.channels_last
    assert wrapped.is_contiguous(memory_format=cl) == zeros.is_contiguous(memory_format=cl)  # the same layout
    assert torch.equal(zeros, again) and not torch.allclose(zeros, wrapped, atol=1e-3)


@needs_packing
@pytest.mark.skipif(not HAS_WINOGRAD, reason="needs AVX512-BF16 and a C++ compiler")
def test_winograd_convolution_pads_circularly(kernels):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).bfloat16().to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.randn(1, 16, 14, 18).bfloat16().to(memory_format=torch.channels_last)
    exact = F.conv2d(F.pad(x.double(), (1, 1, 1, 1), mode="circular"), conv.weight.double(), conv.bias.double())
    zero_exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)

    def rel_rms(a, b):
        return float((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())

    with torch.inference_mode(), packed.packed_session(conv), circular_padding(True, conv):
        assert winograd.usable(conv, x)
        wrapped = conv(x)
        assert conv in packed._WINO  # by Winograd
    assert wrapped.shape == (1, 32, 14, 18) and wrapped.is_contiguous(memory_format=torch.channels_last)
    assert rel_rms(wrapped, exact) < 1e-2 and rel_rms(wrapped, zero_exact) > 0.1


# ----- parity with diffusers' circular UNet and VAE ----------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    ref = build_reference("sd1", seed=11)
    folder = save_folder(ref, tmp_path_factory.mktemp("tiling") / "sd1")
    for m in [*convs(ref.unet), *convs(ref.vae)]:
        m.padding_mode = "circular"  # A1111's apply_circular on the reference
    return ref, folder


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 32, generator=g)
    t = torch.tensor([10.0, 537.25])
    ctx = torch.randn(2, 77, 128, generator=g)
    image = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 12, generator=g)
    return x, t, ctx, image, z


@needs_packing
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_unet_and_vae_match_diffusers_circular_in_packed_sessions(sd1, dtype, request):
    """fp32 to the parity tests' 1e-4 of the output scale; bf16 (oneDNN's packed bf16 convolutions and, with
    the kernels, Winograd) to 5e-2, against diffusers in fp32; zero padding is 0.8 of the scale away."""
    if dtype == "bf16":
        if not packed._half_packable(torch.bfloat16):
            pytest.skip("this CPU's oneDNN has no bf16")
        if HAS_WINOGRAD:
            request.getfixturevalue("kernels")
    ref, folder = sd1
    rel = 1e-4 if dtype == "fp32" else 5e-2
    x, t, ctx, image, z = _inputs()
    with torch.no_grad():
        expected = ref.unet(x, t, encoder_hidden_states=ctx).sample
        decoded = ref.vae.decode(z / ref.spec.scale).sample
        encoded = ref.vae.encode(image).latent_dist.mean * ref.spec.scale
    pipe = latentforge.load(folder, dtype=dtype)
    cast = pipe.unet.dtype
    with torch.inference_mode():
        zero = pipe.unet(x.to(cast), t, ctx.to(cast))
        with circular_padding(True, pipe.unet, pipe.vae), packed.packed_session(pipe.unet, repeated=True):
            got = pipe.unet(x.to(cast), t, ctx.to(cast))
            wrapping = [m for m in convs(pipe.unet) if m.padding_mode == "circular"]
            swapped = [m for m in wrapping if m._parameters["weight"].numel() == 0]  # oneDNN's packed copy
            by_winograd = [m for m in wrapping if m in packed._WINO]
            assert swapped or by_winograd  # the fast paths ran the circular convolutions
            with packed.packed_session(pipe.vae):
                dec, enc = pipe.vae.decode(z), pipe.vae.encode(image)
    if dtype == "bf16" and HAS_WINOGRAD:
        assert by_winograd
    for name, ours, theirs in (("UNet", got, expected), ("decode", dec, decoded), ("encode", enc, encoded)):
        ok, diff, scale = close(ours, theirs, rel)
        assert ok, f"{dtype} {name} max diff {diff:.3g} vs output scale {scale:.3g}"
    assert not close(zero, expected, 0.5)[0]
    assert modes(pipe.unet, pipe.vae) == {"zeros"}


@needs_packing
def test_unet_commutes_with_circular_shifts_only_when_tiling(sd1):
    _, folder = sd1
    pipe = latentforge.load(folder)
    x, t, ctx, _, _ = _inputs(1)
    shift = (8, 16)  # multiples of the UNet's downsampling (3 levels: 8)

    def shifted_pair():
        out = pipe.unet(x, t, ctx)
        moved = pipe.unet(torch.roll(x, shift, (-2, -1)), t, ctx)
        return torch.roll(out, shift, (-2, -1)), moved

    with torch.inference_mode(), packed.packed_session(pipe.unet):
        with circular_padding(True, pipe.unet):
            a, b = shifted_pair()
        c, d = shifted_pair()
    assert close(b, a, 1e-4)[0]
    assert not close(d, c, 0.1)[0]


# ----- generations --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(sd1):
    return latentforge.load(sd1[1])


ARGS = dict(steps=2, seed=9, width=128, height=128, sampler="Euler", cfg_scale=4.0)


@pytest.fixture(scope="module")
def tiled_run(pipe):
    """A tiling generation, its final latent (Euler's last step lands on the denoised estimate) and the
    padding modes the UNet and VAE had while it ran."""
    seen = []

    def progress(p):
        seen.append(modes(pipe.unet, pipe.vae))
        progress.latent = p.denoised.clone()

    result = pipe.txt2img("a tiled floor", tiling=True, progress=progress, **ARGS)
    return result, progress.latent, seen


def test_generation_pads_circularly_while_it_runs_and_the_image_wraps(pipe, tiled_run):
    result, latent, seen = tiled_run
    assert seen and all("circular" in s for s in seen)
    assert modes(pipe.unet, pipe.vae) == {"zeros"}
    image = np.asarray(result.images[0], dtype=np.int16)
    # the decoded image of the latent shifted by half commutes with the shift: the VAE pads circularly
    with torch.inference_mode(), circular_padding(True, pipe.vae):
        moved = pipe.vae.decode(torch.roll(latent, (8, 8), (-2, -1)))
    shifted = np.asarray(latentforge.pipelines.images.tensor_to_images(moved)[0], dtype=np.int16)
    assert np.abs(np.roll(image, (64, 64), (0, 1)) - shifted).max() <= 2
    with torch.inference_mode():  # zero padding: the shifted latent's image has seams inside it
        seamed = pipe.vae.decode(torch.roll(latent, (8, 8), (-2, -1)))
    seamed = np.asarray(latentforge.pipelines.images.tensor_to_images(seamed)[0], dtype=np.int16)
    assert np.abs(np.roll(image, (64, 64), (0, 1)) - seamed).max() > 10


def test_tiling_changes_the_image_and_leaves_the_next_generation_as_before(pipe, tiled_run):
    before_args = dict(ARGS, width=64, height=64)
    plain = np.asarray(pipe.txt2img("a floor", **before_args).images[0], dtype=np.int16)
    tiled = np.asarray(pipe.txt2img("a floor", tiling=True, **before_args).images[0], dtype=np.int16)
    assert np.abs(tiled - plain).max() > 10
    again = np.asarray(pipe.txt2img("a floor", **before_args).images[0], dtype=np.int16)
    assert np.array_equal(again, plain)


def test_padding_comes_back_when_a_generation_fails(pipe):
    def fail(p):
        assert "circular" in modes(pipe.unet)
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        pipe.txt2img("x", tiling=True, progress=fail, **dict(ARGS, width=64, height=64))
    assert modes(pipe.unet, pipe.vae) == {"zeros"}


@needs_packing
def test_packed_generation_gives_the_same_tiled_image(pipe, monkeypatch):
    import importlib

    gen = importlib.import_module("latentforge.pipelines.generate")
    args = dict(ARGS, width=64, height=64)
    plain = np.asarray(pipe.txt2img("a floor", tiling=True, **args).images[0], dtype=np.int16)
    monkeypatch.setattr(gen, "PACK_MIN_UNET_PARAMS", 0)  # the default path of full-size CPU generations
    swapped = []
    progress = lambda p: swapped.append(sum(m._parameters["weight"].numel() == 0 for m in convs(pipe.unet)))  # noqa: E731
    fast = np.asarray(pipe.txt2img("a floor", tiling=True, progress=progress, **args).images[0], dtype=np.int16)
    assert swapped and min(swapped) > 20 and np.abs(fast - plain).max() <= 1
    packed.settle(pipe.unet)


def test_img2img_inpainting_and_hires_run_tiled_also_in_the_vae(pipe, tiled_run):
    from PIL import Image

    seen = []
    progress = lambda p: seen.append(("sample", "circular" in modes(pipe.unet, pipe.vae)))  # noqa: E731
    hooks = [
        part.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, is_circular(m))))
        for name, part in (("encode", pipe.vae.encoder), ("decode", pipe.vae.decoder))
    ]
    image = tiled_run[0].images[0].resize((64, 64))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    small = dict(ARGS, width=64, height=64)
    try:
        pipe.img2img(image, "x", tiling=True, progress=progress, **small)
        pipe.img2img(image, "x", tiling=True, progress=progress, mask=mask, **small)
        pipe.txt2img("x", tiling=True, progress=progress, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", **small)
    finally:
        for hook in hooks:
            hook.remove()
    names = [name for name, _ in seen]
    assert all(on for _, on in seen) and names.count("encode") == 3 and names.count("decode") >= 4
    assert names.count("sample") >= 5
    assert modes(pipe.unet, pipe.vae) == {"zeros"}


def test_refiner_pass_runs_tiled(tmp_path):
    base = latentforge.load(save_folder(build_reference("sdxl-base", seed=61), tmp_path / "base"))
    refiner = latentforge.load(save_folder(build_reference("sdxl-refiner", seed=62), tmp_path / "refiner"))
    seen = []
    progress = lambda p: seen.append(("circular" in modes(base.unet), "circular" in modes(refiner.unet, refiner.vae)))  # noqa: E731
    args = dict(steps=4, seed=1, width=64, height=64, refiner_checkpoint=refiner, refiner_switch_at=0.5)
    base.txt2img("x", tiling=True, progress=progress, **args)
    assert len(seen) == 4 and seen[-1] == (True, True)  # the refiner loaded by the plan is made circular too
    assert modes(base.unet, base.vae, refiner.unet, refiner.vae) == {"zeros"}


def test_batches_keep_tiling_requests_apart():
    from latentforge.pipelines.batch import batch_key

    assert batch_key(GenerationRequest(prompt="x")) is not None
    assert batch_key(GenerationRequest(prompt="x", tiling=True)) is None


# ----- the VAE's tiles go round ------------------------------------------------------------------------------


def test_wrapped_tiles_cover_each_side_evenly_and_round_the_edge():
    assert wrapped_starts(64, 24, 6) == [0, 16, 32, 48]  # 4 tiles of 24 overlapping by >= 6, the last the first
    assert wrapped_starts(64, 96, 24) == [0]
    assert all(s % 8 == 0 for s in wrapped_starts(800, 96 * 8, 24 * 8, down=8))
    x = torch.randn(2, 3, 40, 56)
    maps = [
        (1, 1, lambda t: t * 2 + 1),
        (2, 1, lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)),
        (1, 2, lambda t: F.avg_pool2d(t, 2)),
    ]
    for up, down, fn in maps:
        out = tiled_apply(fn, x, 16, 4, up=up, down=down, wrap=True)
        torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-5)  # pointwise maps: tiles change nothing


def test_tiled_decode_goes_round_the_edges():
    """The demo VAE (trained weights) decodes a 64x64 latent in 24-pixel tiles: with tiling the tiles go
    round, and the error against the whole decode is no larger at the image's edges than at other seams;
    tiles that stopped at the edges would wrap each inside itself there."""
    from latentforge.demo import bundled_model_path
    from latentforge.pipelines.images import image_to_tensor
    from latentforge.train.shapes import Scene, render

    vae = latentforge.load(bundled_model_path(), dtype="fp32").vae
    x = image_to_tensor(render(Scene("red", "circle", "blue", "large", "in the center", ""), resolution=256))
    f = vae.config.downscale
    with torch.inference_mode(), circular_padding(True, vae):
        z = vae.encode(x, tile=0)
        whole, tiled = vae.decode(z, tile=0), vae.decode(z, tile=24)
        stopped = tiled_apply(lambda q: vae.decoder(vae.post_quant_conv(q / vae.scale)), z, 24, 6, up=f)
        rolled = vae.decode(torch.roll(z, (32, 32), (-2, -1)), tile=24)
    for image, ok in ((tiled, True), (stopped, False)):
        diff = (image - whole).abs().mean(dim=(0, 1))  # (H, W)
        col = diff.mean(dim=0)
        assert (float(col.max()) < 5 * float(col.mean())) == ok
    assert float((tiled - whole).abs().mean()) < 0.02
    # a shift by a multiple of the tile spacing moves the tiled image with it
    torch.testing.assert_close(torch.roll(rolled, (-32 * f, -32 * f), (-2, -1)), tiled, rtol=1e-4, atol=1e-4)


# ----- metadata and the command line ------------------------------------------------------------------------


def test_infotext_writes_tiling_and_reads_it_back(pipe):
    from latentforge.io.infotext import format_infotext
    from latentforge.sampling import resolve

    info = resolve("Euler", "automatic")[0]
    for tiling in (True, False):
        req = GenerationRequest(prompt="p", width=64, height=64, cfg_scale=7.0, tiling=tiling)
        params = infotext_params(pipe, req, 1, info, "txt2img")
        text = format_infotext("p", "", params)
        assert ("Tiling: True" in text) == tiling
        back, _ = request_from_infotext(text)
        assert back.tiling is tiling and "Tiling" not in back.extra
    assert request_from_infotext("p\nSteps: 3, Sampler: Euler, Seed: 1, Tiling: False")[0].tiling is False


def test_generated_image_records_tiling(tiled_run, tmp_path):
    from latentforge.io.images import save_png

    result = tiled_run[0]
    assert "Tiling: True" in result.infotexts[0]
    assert result.request.to_dict()["tiling"] is True
    path = save_png(result.images[0], tmp_path / "t.png")
    assert request_from_image(path)[0].tiling is True  # the JSON record
    assert request_from_infotext(result.infotexts[0])[0].tiling is True


def test_cli_tiling_flag_reaches_the_request(sd1, tmp_path):
    from latentforge.cli import build_parser, main
    from latentforge.cli_generate import build_request

    cases = [
        (["txt2img", "x"], False),
        (["txt2img", "x", "--tiling"], True),
        (["img2img", "in.png", "x", "--tiling"], True),
        (["upscale-x4", "in.png", "x", "--tiling"], True),
    ]
    for argv, want in cases:
        args = build_parser().parse_args(argv)
        img2img, x4 = argv[0] != "txt2img", argv[0] == "upscale-x4"
        assert build_request(args, img2img, x4)[0].tiling is want
    out = tmp_path / "t.png"
    args = ["txt2img", "a cube", "-m", str(sd1[1]), "-W", "64", "-H", "64", "--steps", "1", "--seed", "5", "-q"]
    assert main([*args, "--tiling", "-o", str(out)]) == 0
    assert request_from_image(out)[0].tiling is True
    again = ["txt2img", "--from", str(out), "--no-tiling", "-m", str(sd1[1]), "-q", "-o", str(tmp_path / "u.png")]
    assert main(again) == 0
    assert request_from_image(tmp_path / "u.png")[0].tiling is False
