"""Inpainting against A1111 1.10's rules (modules/processing.py ``StableDiffusionProcessingImg2Img.init`` and
``sample``, sd_samplers_cfg_denoiser.py ``apply_blend``, sd_samplers_common.py ``setup_img2img_steps``): each
expectation is computed here from the rule as A1111 states it, never from latentforge's own output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.pipelines import GenerationRequest, inpaint
from latentforge.pipelines.generate import build_plan
from latentforge.pipelines.images import image_to_tensor
from latentforge.pipelines.metadata import request_from_infotext
from latentforge.pipelines.request import InpaintOptions
from latentforge.sampling.noise import ImageNoise, NoiseOptions
from test_inpaint import _box_mask, _photo
from tiny import build_reference, save_folder


def _settings(text: str) -> dict:
    return dict(part.split(": ", 1) for part in text.splitlines()[-1].split(", "))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111_inpaint")
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = latentforge.load(save_folder(build_reference(family, seed=81), root / family), dtype="fp32")
        return made[family]

    return get


# 1. images.flatten(img, opts.img2img_background_color) before resize and overlay


def test_rgba_init_image_is_flattened_onto_white():
    rgb = np.full((64, 64, 3), (10, 60, 200), np.uint8)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :16] = 0  # transparent left band (under it: blue, which A1111 never shows)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    job = inpaint.prepare([rgba], InpaintOptions(mask=_box_mask(), mask_blur=0), 64, 64, 0, 8)
    image = np.asarray(job.images[0])
    assert (image[:, :16] == 255).all() and (image[:, 16:] == (10, 60, 200)).all()
    overlay = np.asarray(job.overlays[0])  # the kept pixels laid over the result: flattened too
    assert (overlay[:, :16] == (255, 255, 255, 255)).all()


def test_rgba_init_image_shows_white_in_the_output(demo):
    init = _photo().convert("RGBA")
    arr = np.asarray(init).copy()
    arr[:, :16, 3] = 0
    result = demo.img2img(Image.fromarray(arr, "RGBA"), "a cube", mask=_box_mask(), mask_blur=0,
                          denoising_strength=0.6, steps=3, seed=2)  # fmt: skip
    out = np.asarray(result.images[0])
    assert (out[:, :16] == 255).all()  # unmasked, so the flattened init image's own pixels
    assert np.array_equal(out[:, 16:24], np.asarray(_photo())[:, 16:24])


# 2. and 3. mask_round=False: create_binary_mask(image, round=False) keeps the raw alpha, and the
# inpainting model's mask is rounded only when round_image_mask


def _alpha_ramp() -> tuple[Image.Image, np.ndarray]:
    y, x = np.mgrid[0:64, 0:64]
    alpha = np.clip(255 - np.hypot(x - 32, y - 32) * 7, 0, 255).astype(np.uint8)
    rgba = np.dstack([np.full((64, 64, 3), 255, np.uint8), alpha])
    return Image.fromarray(rgba, "RGBA"), alpha


def test_mask_round_off_reads_an_rgba_masks_alpha_as_it_is():
    mask, alpha = _alpha_ramp()
    job = inpaint.prepare([_photo()], InpaintOptions(mask=mask, mask_blur=0, mask_round=False), 64, 64, 0, 8)
    # A1111: latmask = image_mask.convert("RGB").resize((w // 8, h // 8)), channel 0 / 255, not rounded
    small = np.asarray(Image.fromarray(alpha).convert("RGB").resize((8, 8)), dtype=np.float32)[..., 0] / 255
    assert np.array_equal(job.latent_mask[0, 0].numpy(), small)
    assert ((small > 0) & (small < 1)).any()
    assert np.array_equal(np.asarray(inpaint.binary_mask(mask, round=False)), alpha)


def test_mask_round_off_gives_an_inpainting_model_the_unrounded_mask(tiny):
    pipe = tiny("sd1-inpaint")
    options = InpaintOptions(mask=_box_mask(), mask_blur=4, mask_round=False)
    job = inpaint.prepare([_photo()], options, 64, 64, 0, 8)
    blurred = cv2.GaussianBlur(np.asarray(_box_mask()), (2 * int(2.5 * 4 + 0.5) + 1, 1), 4)
    blurred = cv2.GaussianBlur(blurred, (1, 2 * int(2.5 * 4 + 0.5) + 1), 4)
    expected = torch.from_numpy(blurred.astype(np.float32) / 255)[None, None]
    assert torch.equal(job.condition_mask, expected)
    with torch.inference_mode():
        concat = inpaint.model_concat(pipe, job, 1.0)
        source = image_to_tensor(_photo())
        cleared = pipe.vae.encode(torch.lerp(source, source * (1 - expected), 1.0)).float()
    torch.testing.assert_close(concat[:, :1], torch.nn.functional.interpolate(expected, size=(8, 8)))
    assert ((concat[:, :1] > 0) & (concat[:, :1] < 1)).any()
    torch.testing.assert_close(concat[:, 1:], cleared)


# 4. and 5. latent noise / latent nothing: A1111's init() makes init_latent = init_latent * mask + noise * nmask
# once, the noise from all_seeds[0:batch]; apply_blend and sample() hold that modified init_latent


def _plan(pipe, **options):
    req = GenerationRequest.from_dict(dict(prompt="a cube", width=64, height=64, steps=4, cfg_scale=7.0, **options))
    req.validate(img2img=True)
    with torch.inference_mode():
        plan = build_plan(pipe, req, [_photo()])
        o = req.inpaint
        job = inpaint.prepare([_photo()], o, 64, 64, req.resize_mode, pipe.vae.config.downscale)
        init = pipe.vae.encode(image_to_tensor(job.images[0])).float()
    return plan, init, job.latent_mask


def _blended(p, x: torch.Tensor) -> torch.Tensor:
    """The pass's wrappers around a denoiser whose estimate is all zeros."""
    d = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    for wrap in p.wrappers:
        d = wrap(d)
    return d(x, torch.tensor(1.0))


@pytest.mark.parametrize("fill", [2, 3])
def test_unrounded_blend_holds_the_init_latent_after_the_masked_content(demo, fill):
    plan, init, r = _plan(demo, mask=_box_mask(), mask_blur=8, mask_round=False, inpainting_fill=fill, seed=40)
    assert ((r > 0) & (r < 1)).any()
    first = plan.passes[0]
    with torch.inference_mode():
        x = first.start(0, None, [40])
        noise = ImageNoise([40], first.shape, options=NoiseOptions()).next() if fill == 2 else 0
        modified = init * (1 - r) + noise * r  # A1111: init_latent * mask + noise * nmask (nothing: no noise)
        torch.testing.assert_close(x, modified, rtol=0, atol=1e-6)
        held = modified * (1 - r)  # apply_blend of a zero estimate: 0 * nmask + init_latent * mask
        torch.testing.assert_close(_blended(first, x), held, rtol=0, atol=1e-6)
        torch.testing.assert_close(first.finish(torch.zeros_like(x)), held, rtol=0, atol=1e-6)


@pytest.mark.parametrize("subseed_strength", [0.0, 0.5])
def test_latent_noise_of_every_batch_comes_from_the_first_batchs_seeds(demo, subseed_strength):
    plan, _, r = _plan(demo, mask=_box_mask(), mask_blur=0, inpainting_fill=2, seed=50, batch_size=2,
                       batch_count=3, subseed=9, subseed_strength=subseed_strength)  # fmt: skip
    first = plan.passes[0]
    step = 0 if subseed_strength else 1  # A1111's all_seeds: seed + i, or the seed itself with variations
    all_seeds = [50 + i * step for i in range(6)]
    want = ImageNoise(all_seeds[0:2], first.shape, options=NoiseOptions()).next()  # create_random_tensors
    with torch.inference_mode():
        for iteration in range(3):
            x = first.start(iteration, None, all_seeds[iteration * 2 : iteration * 2 + 2])
            inside = r.expand_as(x) == 1
            assert torch.equal(x[inside], want[inside]), iteration


# 6. "Only masked" with a blank mask: A1111 switches to img2img (no mask, no overlay, inpaint_full_res off)


@pytest.mark.parametrize("family", ["demo", "sd1-inpaint"])
def test_only_masked_with_an_empty_mask_is_plain_img2img(demo, tiny, family):
    pipe = demo if family == "demo" else tiny(family)
    init = _photo(80, 64)  # fitted to 64x64 with the request's resize mode (1: crop and resize)
    common = dict(denoising_strength=0.6, steps=4, seed=6, width=64, height=64, resize_mode=1, cfg_scale=7.0)
    empty = Image.new("L", (80, 64), 0)
    result = pipe.img2img(init, "a cube", mask=empty, inpaint_full_res=True, inpainting_fill=2, **common)
    plain = pipe.img2img(init, "a cube", **common)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))
    settings = _settings(result.infotexts[0])
    assert "Inpaint area" not in settings and "Masked content" not in settings and settings["Mask blur"] == "4"


# 7. The refiner switches models inside the same CFGDenoiser: the mask blend goes on, the final blend is once


def test_refiner_continues_the_mask_blend_and_blends_once_at_the_end(demo):
    """With the base model as its own refiner, A1111's run is the run without a refiner (Euler has no
    history, and the denoiser with its blend is the same); every denoised estimate, the refiner's
    too, is held to the original outside the mask."""
    init, mask = _photo(), _box_mask()
    common = dict(mask=mask, mask_blur=0, denoising_strength=0.8, steps=6, seed=3, sampler="Euler", cfg_scale=7.0)
    seen: list[torch.Tensor] = []
    refined = demo.img2img(init, "a green square", refiner_checkpoint=demo, refiner_switch_at=0.5,
                           progress=lambda p: seen.append(p.denoised.clone()), **common)  # fmt: skip
    alone = demo.img2img(init, "a green square", **common)
    assert np.array_equal(np.asarray(refined.images[0]), np.asarray(alone.images[0]))
    with torch.inference_mode():
        original = demo.vae.encode(image_to_tensor(init)).float()
    side = 64 // demo.vae.config.downscale
    keep = 1 - torch.from_numpy(np.asarray(mask.resize((side, side)), dtype=np.float32) / 255).round()
    assert len(seen) == 5  # t_enc = int(0.8 * 6) = 4: 5 steps, some of them the refiner's
    for d in seen:
        assert torch.equal(d * keep, original * keep)


def test_inpainting_base_with_a_plain_refiner(tiny):
    """A1111 passes the image conditioning on, but only a 9-channel UNet concatenates it: the plain
    refiner sees the latents alone, and the blend holds them through its steps."""
    base, plain = tiny("sd1-inpaint"), tiny("sd1")
    req = GenerationRequest.from_dict(dict(prompt="a cube", width=64, height=64, steps=4, cfg_scale=7.0, seed=4,
                                           mask=_box_mask(), denoising_strength=1.0, refiner_checkpoint=plain,
                                           refiner_switch_at=0.5))  # fmt: skip
    req.validate(img2img=True)
    from latentforge.pipelines import refiner

    with torch.inference_mode():
        plan = build_plan(base, req, [_photo()], refiner.prepare(base, req))
    first, second = plan.passes
    assert first.cond.entries[0][1].concat.shape[1] == 5 and second.cond.entries[0][1].concat is None
    assert second.wrappers and second.finish is not None and first.finish is None
    result = base.img2img(_photo(), request=req)
    assert "Conditional mask weight: 1.0" in result.infotexts[0]


# 8. "Mask blur": A1111 writes p.mask_blur, None (left out) when mask_blur_x != mask_blur_y


def test_mask_blur_is_left_out_when_x_and_y_differ(demo):
    job = inpaint.prepare([_photo()], InpaintOptions(mask=_box_mask(), mask_blur_x=3, mask_blur_y=7), 64, 64, 0, 8)
    assert "Mask blur" not in job.infotext
    job = inpaint.prepare([_photo()], InpaintOptions(mask=_box_mask(), mask_blur_x=5, mask_blur_y=5), 64, 64, 0, 8)
    assert job.infotext["Mask blur"] == "5"
    for extra in ({}, {"inpaint_full_res": True}):
        result = demo.img2img(_photo(), "a cube", mask=_box_mask(), mask_blur_x=3, mask_blur_y=7, steps=2, **extra)
        assert "Mask blur" not in _settings(result.infotexts[0])
        req, _ = request_from_infotext(result.infotexts[0])  # reads, and the rest comes back
        assert req.steps == 2 and (req.inpaint is not None) == bool(extra)


# 9. "Conditional mask weight": written whenever p.is_using_inpainting_conditioning, as the weight's str


def test_conditional_mask_weight_is_written_for_every_inpainting_model_run(demo, tiny):
    pipe = tiny("sd1-inpaint")
    runs = {
        "txt2img": pipe.txt2img("a cube", width=64, height=64, steps=2, seed=1),
        "img2img": pipe.img2img(_photo(), "a cube", steps=2, seed=1, denoising_strength=0.5),
        "masked": pipe.img2img(_photo(), "a cube", mask=_box_mask(), steps=2, seed=1, inpainting_mask_weight=0.5),
    }
    weights = {name: _settings(r.infotexts[0]).get("Conditional mask weight") for name, r in runs.items()}
    assert weights == {"txt2img": "1.0", "img2img": "1.0", "masked": "0.5"}
    assert "Denoising strength: 0.5, Conditional mask weight: 1.0" in runs["img2img"].infotexts[0]
    ordinary = demo.img2img(_photo(), "a cube", mask=_box_mask(), steps=2, inpainting_mask_weight=0.5)
    assert "Conditional mask weight" not in ordinary.infotexts[0]
    again, _ = request_from_infotext(runs["txt2img"].infotexts[0])  # no inpainting request: txt2img again
    assert again.inpaint is None
    assert np.array_equal(np.asarray(pipe.txt2img(request=again).images[0]), np.asarray(runs["txt2img"].images[0]))


# 9b. inpainting_image_conditioning without a mask (plain img2img; the hires pass): conditioning_mask = ones,
# conditioning_image = lerp(source, source * (1 - 1), weight), encoded; the hires pass of a latent upscaler
# decodes the upscaled latents for it only when the weight is below 1 (sample_hr_pass)


def _expected_concat(pipe, source: torch.Tensor, weight: float) -> torch.Tensor:
    with torch.inference_mode():
        latent = pipe.vae.encode(torch.lerp(source, source * 0.0, weight)).float()
    return torch.cat([torch.ones_like(latent[:, :1]), latent], dim=1)


def test_mask_weight_clears_the_init_image_of_a_plain_img2img(tiny):
    pipe = tiny("sd1-inpaint")
    for weight in (0.4, 1.0):
        req = GenerationRequest.from_dict(
            dict(prompt="a cube", width=64, height=64, steps=3, inpainting_mask_weight=weight)
        )
        req.validate(img2img=True)
        with torch.inference_mode():
            plan = build_plan(pipe, req, [_photo()])
        got = plan.passes[0].cond.entries[0][1].concat
        want = _expected_concat(pipe, image_to_tensor(_photo()), weight)
        assert torch.allclose(got.float(), want, atol=1e-5), weight
    weighted = pipe.img2img(_photo(), "a cube", steps=2, seed=1, inpainting_mask_weight=0.4)
    assert _settings(weighted.infotexts[0])["Conditional mask weight"] == "0.4"
    again, _ = request_from_infotext(weighted.infotexts[0])
    assert again.inpainting_mask_weight == 0.4 and again.inpaint is None
    plain = pipe.img2img(_photo(), "a cube", steps=2, seed=1)
    assert not np.array_equal(np.asarray(weighted.images[0]), np.asarray(plain.images[0]))


def test_cli_mask_weight_reaches_a_plain_img2img(tmp_path):
    from latentforge.cli import main

    folder = save_folder(build_reference("sd1-inpaint", seed=81), tmp_path / "m")
    _photo().save(tmp_path / "in.png")
    args = ["img2img", str(tmp_path / "in.png"), "a cube", "-m", str(folder), "--steps", "2", "-q"]
    assert main([*args, "--mask-weight", "0.4", "-o", str(tmp_path / "a.png")]) == 0
    assert _settings(Image.open(tmp_path / "a.png").info["parameters"])["Conditional mask weight"] == "0.4"


def test_mask_weight_conditions_the_hires_pass_on_the_upscaled_image(tiny):
    pipe = tiny("sd1-inpaint")
    first = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for upscaler in ("Latent", "Lanczos"):
        options = dict(prompt="a cube", width=64, height=64, steps=2, enable_hr=True, hr_scale=2, hr_upscaler=upscaler)
        req = GenerationRequest.from_dict({**options, "inpainting_mask_weight": 0.25})
        req.validate()
        with torch.inference_mode():
            plan = build_plan(pipe, req, None)
            hires_pass = plan.passes[1]
            start = hires_pass.start(0, first, [1])
            got = hires_pass.batch_concat(0, [1])
            if upscaler == "Latent":  # decode_first_stage of the upscaled latents
                source = pipe.vae.decode(start).float()
            else:  # the resized 8-bit image (truncated, A1111), in [-1, 1]
                low = ((pipe.vae.decode(first).float() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
                image = Image.fromarray((255.0 * low).astype(np.uint8)).resize((128, 128), Image.LANCZOS)
                source = image_to_tensor(image)
        assert torch.allclose(got.float(), _expected_concat(pipe, source, 0.25), atol=1e-4), upscaler
        default = GenerationRequest.from_dict(options)
        with torch.inference_mode():
            assert build_plan(pipe, default, None).passes[1].batch_concat is None  # weight 1: the grey default


# 10. Denoising strength 0: t_enc = int(0 * steps) = 0, and the sampler runs over sigmas[steps - 1:] (one step)


def test_denoising_strength_zero_still_makes_one_step(demo):
    steps = []
    zero = demo.img2img(_photo(), "a cube", denoising_strength=0.0, steps=10, seed=8, cfg_scale=7.0,
                        progress=lambda p: steps.append(p.steps))  # fmt: skip
    small = demo.img2img(_photo(), "a cube", denoising_strength=0.05, steps=10, seed=8, cfg_scale=7.0)
    assert steps == [1]
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(small.images[0]))  # int(0.05 * 10) = 0 too
    assert "Denoising strength: 0," in zero.infotexts[0]


def test_sde_img2img_draws_from_trees_over_the_whole_schedule(monkeypatch):
    """A1111's sample_img2img gives create_noise_sampler the whole schedule (sigmas, not sigma_sched): with
    DPM++ 2M SDE at strength 0.5 the trees still reach the schedule's largest sigma."""
    import sys

    import latentforge

    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model in this installation")
    pipe = latentforge.load(path)
    generate = sys.modules["latentforge.pipelines.generate"]
    ranges = []
    original = generate.BrownianNoise

    def spy(seeds, shape, lo, hi, **kwargs):
        ranges.append(float(hi))
        return original(seeds, shape, lo, hi, **kwargs)

    monkeypatch.setattr(generate, "BrownianNoise", spy)
    init = Image.new("RGB", (64, 64), (120, 80, 40))
    options = dict(steps=6, seed=3, width=64, height=64, sampler="DPM++ 2M SDE", denoising_strength=0.5)
    pipe.img2img(init, "a cube", **options)
    txt = pipe.txt2img("a cube", **{k: v for k, v in options.items() if k != "denoising_strength"})
    assert txt.images and len(ranges) == 2 and ranges[0] == pytest.approx(ranges[1])
