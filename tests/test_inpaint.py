"""Inpainting and outpainting: A1111's mask handling, the 9-channel model input against diffusers, the
masked sampling rule for ordinary models, and the pixels that must not change."""

from __future__ import annotations

import diffusers as D
import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.pipelines import RequestError
from latentforge.pipelines.inpaint import binary_mask, blur_mask, crop_region
from tiny import build_reference, hf_tokenizer, save_folder

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _photo(w: int = 64, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 3.5) % 256, (y * 2.5) % 256, ((x * y) // 7) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def _box_mask(w=64, h=64, box=(24, 16, 48, 40)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


@pytest.mark.parametrize("sigma_x, sigma_y", [(4, 4), (1.5, 0), (0, 7), (10, 3)])
def test_mask_blur_is_a1111s_separable_gaussian(sigma_x, sigma_y):
    """An impulse blurs into the outer product of the two normalised Gaussian kernels of A1111's sizes
    (2 * int(2.5 * sigma + 0.5) + 1), x first: within OpenCV's 8-bit rounding of each pass."""
    impulse = np.zeros((81, 81), np.uint8)
    impulse[40, 40] = 255

    def kernel(sigma):
        if not sigma:
            return np.array([1.0])
        n = 2 * int(2.5 * sigma + 0.5) + 1
        x = np.arange(n) - (n - 1) / 2
        k = np.exp(-(x**2) / (2 * sigma**2))
        return k / k.sum()

    kx, ky = kernel(sigma_x), kernel(sigma_y)
    expected = np.zeros((81, 81))
    expected[40 - len(ky) // 2 : 40 + len(ky) // 2 + 1, 40 - len(kx) // 2 : 40 + len(kx) // 2 + 1] = (
        255 * ky[:, None] * kx[None, :]
    )
    ours = np.asarray(blur_mask(Image.fromarray(impulse), sigma_x, sigma_y)).astype(float)
    assert np.abs(ours - expected).max() <= 2.0
    assert (ours > 0).sum() >= 3  # the impulse was spread


def test_mask_reading_alpha_grey_and_invert():
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 129), (255, 255, 255, 255)])
    assert list(binary_mask(rgba).getdata()) == [0, 0, 255, 255]  # alpha above 128 counts
    opaque = Image.new("RGBA", (2, 1), (200, 200, 200, 255))
    assert list(binary_mask(opaque).getdata()) == [200, 200]  # no transparency: the grey level
    assert binary_mask(Image.new("RGB", (3, 3), (255, 255, 255))).mode == "L"


def test_only_masked_region_follows_a1111s_rule():
    # A1111's documented example: a mask drawn in a 128x32 region processed at 512x512 becomes 128x128
    mask = _box_mask(512, 512, (100, 200, 228, 232))
    assert crop_region(mask, 0, 512, 512) == (100, 152, 228, 280)
    # padding grows the box within the image, then the short side grows to the output's ratio (2:1)
    mask = _box_mask(256, 256, (10, 10, 30, 50))
    # box (10,10)-(30,50) + 8 -> (2,2)-(38,58): 36x56; width grows to 112: 2-38 -> -36..76 -> 0..112
    assert crop_region(mask, 8, 128, 64) == (0, 2, 112, 58)
    assert crop_region(Image.new("L", (32, 32), 0), 4, 64, 64) is None


def test_ordinary_model_holds_the_unmasked_latents_and_pixels(demo):
    """A1111's rule for ordinary models: every denoised estimate (and the final latent) equals the
    original latent outside the mask; after the overlay, unmasked pixels are the original bytes."""
    init = _photo()
    mask = _box_mask()
    seen = []
    result = demo.img2img(
        init,
        "a green square",
        mask=mask,
        mask_blur=0,
        denoising_strength=0.8,
        steps=6,
        seed=3,
        progress=lambda p: seen.append(p.denoised.clone()),
    )
    with torch.inference_mode():
        from latentforge.pipelines.images import image_to_tensor

        original = demo.vae.encode(image_to_tensor(init)).float()
    keep = (
        1
        - torch.nn.functional.interpolate(
            torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None], size=original.shape[-2:]
        ).round()
    )
    for d in seen:
        torch.testing.assert_close(d * keep, original * keep, rtol=0, atol=0)
    out, src = np.asarray(result.images[0]), np.asarray(init)
    m = np.asarray(mask) > 0
    assert np.array_equal(out[~m], src[~m])
    assert np.abs(out[m].astype(int) - src[m].astype(int)).mean() > 10  # the masked area was repainted
    assert "Denoising strength: 0.8" in result.infotexts[0] and "Mask blur" not in result.infotexts[0]


def test_mask_round_off_keeps_the_blurred_masks_grey_levels_in_the_blend(demo):
    """A1111 1.8+'s ``mask_round`` (default true) rounds the latent mask to 0/1. Off, latents where the
    blurred mask is between 0 and 0.5 are partly repainted instead of held to the original (where it is 0
    they are still held exactly). The infotext says so ("Mask rounding: False") and reads back."""
    from latentforge.pipelines.images import image_to_tensor
    from latentforge.pipelines.metadata import request_from_infotext

    init, mask = _photo(), _box_mask()
    with torch.inference_mode():
        original = demo.vae.encode(image_to_tensor(init)).float()
    held = {}
    for rounding in (True, False):
        seen: list[torch.Tensor] = []
        options = dict(mask=mask, mask_blur=8, denoising_strength=0.8, steps=4, seed=3, mask_round=rounding)
        result = demo.img2img(init, "a green square", progress=lambda p, seen=seen: seen.append(p.denoised), **options)
        held[rounding] = int((seen[-1] == original).sum())
        text = result.infotexts[0]
        assert ("Mask rounding: False" in text) == (not rounding)
        assert request_from_infotext(text)[0].inpaint.mask_round == rounding
    assert 0 < held[False] < held[True]  # (measured 188 and 928 of 1024 latent values: a wide blur)


def test_only_masked_touches_only_the_padded_crop(demo):
    init, mask = _photo(96, 96), _box_mask(96, 96, (40, 40, 56, 56))
    result = demo.img2img(
        init, "a red circle", mask=mask, inpaint_full_res=True, inpaint_full_res_padding=8,
        denoising_strength=0.9, steps=5, seed=4, width=64, height=64,
    )  # fmt: skip
    out, src = np.asarray(result.images[0]), np.asarray(init)
    assert out.shape == src.shape
    x1, y1, x2, y2 = crop_region(blur_mask(mask, 4, 4), 8, 64, 64)
    outside = np.ones(src.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], src[outside])
    assert not np.array_equal(out[~outside], src[~outside])
    assert "Inpaint area: Only masked" in result.infotexts[0] and "Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("fill", [0, 2, 3])
def test_masked_content_modes_run_and_keep_unmasked_pixels(demo, fill):
    init, mask = _photo(), _box_mask()
    result = demo.img2img(init, "a cube", mask=mask, inpainting_fill=fill, denoising_strength=0.7, steps=4, seed=5)
    m = np.asarray(blur_mask(mask, 4, 4)) > 0
    assert np.array_equal(np.asarray(result.images[0])[~m], np.asarray(init)[~m])
    assert f"Masked content: {['fill', 'original', 'latent noise', 'latent nothing'][fill]}" in result.infotexts[0]


def test_outpainting_keeps_every_original_pixel_and_reads_back(demo, tmp_path):
    from latentforge.pipelines.metadata import request_from_infotext

    init = _photo(60, 64)  # 60 + 16 + 8 = 84: the right margin grows to 12 to reach 88
    result = demo.img2img(
        init, "a blue background", inpaint={"outpaint_left": 16, "outpaint_right": 8, "outpaint_top": 8},
        denoising_strength=0.9, steps=5, seed=6,
    )  # fmt: skip
    out = np.asarray(result.images[0])
    assert out.shape == (72, 88, 3)
    assert np.array_equal(out[8:72, 16:76], np.asarray(init))
    req, _ = request_from_infotext(result.infotexts[0])
    assert req.inpaint.outpaint == (16, 8, 8, 0) and req.inpaint.mask_blur == 4


def test_cli_inpaints_and_from_reproduces(demo, tmp_path):
    from latentforge.cli import main

    _photo().save(tmp_path / "in.png")
    _box_mask().save(tmp_path / "mask.png")
    args = ["img2img", str(tmp_path / "in.png"), "a cube", "--mask", str(tmp_path / "mask.png"), "--steps", "4"]
    assert main([*args, "--seed", "8", "--inpaint-fill", "latent-noise", "-q", "-o", str(tmp_path / "a.png")]) == 0
    redo = ["img2img", str(tmp_path / "in.png"), "--from", str(tmp_path / "a.png"), "-q", "-o", str(tmp_path / "b.png")]
    assert main(redo) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_bad_masks_are_refused_before_any_work(demo, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(RequestError, match="cannot read mask"):
        demo.img2img(_photo(), "x", mask=tmp_path / "bad.png", steps=2)
    with pytest.raises(RequestError, match="inpainting_fill must be"):
        demo.img2img(_photo(), "x", mask=_box_mask(), inpainting_fill=7, steps=2)
    with pytest.raises(RequestError, match="multiple of 8"):
        demo.img2img(_photo(), "x", inpaint={"outpaint_left": 5}, steps=2)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inpaint9")
    ref = build_reference("sd1-inpaint", seed=70)
    return ref, latentforge.load(save_folder(ref, tmp / "m"), dtype="fp32"), hf_tokenizer("<|endoftext|>", tmp)


def test_nine_channel_input_matches_diffusers(inpaint_model):
    """The extra channels: diffusers' mask (binarised, nearest to latent size) and the latent of
    image * (mask < 0.5), with the same VAE encoding; ours through the family's conditioner."""
    ref, ours, tok = inpaint_model
    from latentforge.pipelines.images import image_to_tensor

    image, mask = image_to_tensor(_photo()), _box_mask()
    pipe = D.StableDiffusionInpaintPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, D.EulerDiscreteScheduler(**BASE), None, None,
        requires_safety_checker=False,
    )  # fmt: skip
    condition = pipe.mask_processor.preprocess(mask, height=64, width=64)
    with torch.no_grad():
        masked_latent = ref.vae.encode(image * (condition < 0.5)).latent_dist.mean * ref.vae.config.scaling_factor
        theirs_mask, theirs_latent = pipe.prepare_mask_latents(
            condition, masked_latent, 1, 64, 64, torch.float32, "cpu", None, False
        )
    mask_t = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    concat = ours.family.conditioner.masked_image_concat(ours.vae, image, mask_t)
    torch.testing.assert_close(concat[:, :1], theirs_mask)
    torch.testing.assert_close(concat[:, 1:], theirs_latent, rtol=1e-4, atol=1e-4 * float(theirs_latent.abs().max()))


def test_nine_channel_inpainting_matches_the_diffusers_pipeline(inpaint_model):
    """Whole-image inpainting (all white mask: A1111's latent blend has nothing to hold) end to end
    against StableDiffusionInpaintPipeline with the same latents, noise and Euler steps."""
    ref, ours, tok = inpaint_model
    from latentforge.pipelines.images import image_to_tensor

    init = _photo()
    white = Image.new("L", (64, 64), 255)
    with torch.inference_mode():
        latent = ours.vae.encode(image_to_tensor(init))
        zeros_latent = ours.vae.encode(torch.zeros(1, 3, 64, 64))
    pipe = D.StableDiffusionInpaintPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet,
        D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"), None, None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a cube", image=latent, mask_image=white, masked_image_latents=zeros_latent, strength=0.6,
        num_inference_steps=10, guidance_scale=7.0, generator=torch.Generator().manual_seed(11), output_type="np",
        height=64, width=64,
    ).images  # fmt: skip
    result = ours.img2img(
        init, "a cube", mask=white, mask_blur=0, denoising_strength=0.5, steps=10, cfg_scale=7.0, seed=11,
        sampler="Euler", schedule="normal",
    )  # fmt: skip
    diff = np.abs(np.asarray(result.images[0], dtype=np.float32) / 255 - theirs[0])
    assert diff.max() <= 2 / 255 + 1e-6, diff.max() * 255
