"""End to end against diffusers: same random tiny weights, prompt, seed and starting latent.

txt2img against StableDiffusionPipeline and StableDiffusionXLPipeline, img2img against
StableDiffusionImg2ImgPipeline, for Euler, DPM++ 2M Karras and DDIM. Each diffusers scheduler is set up
as the matching latentforge choice (see test_samplers_diffusers.py for the settings' reasons);
images must agree within 2/255 per channel.
"""

from __future__ import annotations

import diffusers as D
import numpy as np
import pytest
import torch

import latentforge
from latentforge.pipelines.plan import img2img_sigmas
from latentforge.sampling import NoiseSchedule, get_sigmas
from tiny import build_reference, diffusers_sdxl, hf_tokenizer, save_folder

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SAMPLERS = {
    # ours: (sampler, request options); theirs: scheduler
    "euler": (
        dict(sampler="Euler", schedule="normal"),
        lambda: D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"),
    ),
    "dpmpp_2m_karras": (
        dict(sampler="DPM++ 2M Karras", sgm_noise_multiplier=True, quantize_timesteps=True),
        lambda: D.DPMSolverMultistepScheduler(**BASE, use_karras_sigmas=True, final_sigmas_type="zero"),
    ),
    "ddim": (
        dict(sampler="DDIM", sgm_noise_multiplier=True),
        lambda: D.DDIMScheduler(**BASE, steps_offset=1, clip_sample=False, set_alpha_to_one=True),
    ),
}
PROMPT, NEGATIVE = "a photo of a red cube on a wooden table", "blurry, low quality"


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])


def _assert_images_close(ours, theirs):
    diff = np.abs(_np(ours) - theirs)
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel diff {diff.max() * 255:.2f}/255, mean {diff.mean() * 255:.3f}/255"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1e2e")
    ref = build_reference("sd1", seed=21)
    ours = latentforge.load(save_folder(ref, tmp / "m"))
    return ref, ours, hf_tokenizer("<|endoftext|>", tmp)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_txt2img_matches_stable_diffusion_pipeline(sd1, name):
    ref, ours, tok = sd1
    options, scheduler = SAMPLERS[name]
    pipe = D.StableDiffusionPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, scheduler(), None, None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1234),
        output_type="np",
    ).images
    result = ours.txt2img(
        PROMPT, negative_prompt=NEGATIVE, steps=10, cfg_scale=7.0, width=64, height=64, seed=1234, **options
    )
    _assert_images_close(result.images, theirs)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "ddim"])
def test_img2img_matches_img2img_pipeline(sd1, name):
    ref, ours, tok = sd1
    options, scheduler = SAMPLERS[name]
    options = {k: v for k, v in options.items() if k != "sgm_noise_multiplier"}
    init = _init_image()
    with torch.inference_mode():
        from latentforge.pipelines.images import image_to_tensor, prepare_image

        latent = ours.vae.encode(image_to_tensor(prepare_image(init, 64, 64, 0)))
    pipe = D.StableDiffusionImg2ImgPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, scheduler(), None, None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    # A1111's rule starts one step earlier than diffusers' for the same strength: strength 0.5 of 10
    # steps runs 6 steps in A1111 (and latentforge), which diffusers does at strength 0.6.
    theirs = pipe(
        PROMPT,
        image=latent,
        strength=0.6,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(99),
        output_type="np",
    ).images
    result = ours.img2img(
        init,
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=10,
        cfg_scale=7.0,
        denoising_strength=0.5,
        seed=99,
        width=64,
        height=64,
        **options,
    )
    _assert_images_close(result.images, theirs)


def test_a1111_img2img_step_rule():
    """A1111: t_enc = int(min(strength, 0.999) * steps); sampling starts at sigmas[steps - t_enc - 1]."""
    sigmas = get_sigmas("karras", NoiseSchedule(), 20)
    assert torch.equal(img2img_sigmas(sigmas, 20, 0.75), sigmas[4:])  # 16 sigmas -> 15 + 1 steps
    assert torch.equal(img2img_sigmas(sigmas, 20, 1.0), sigmas[:])  # capped at 0.999 -> 19 -> all 20 steps
    assert torch.equal(img2img_sigmas(sigmas, 20, 0.0), sigmas[19:])


def _init_image():
    from PIL import Image

    y, x = np.mgrid[0:80, 0:96]
    arr = np.stack([(x * 2.5) % 256, (y * 3.0) % 256, ((x + y) * 1.5) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("negative", ["", "dark, gloomy"])
def test_txt2img_matches_stable_diffusion_xl_pipeline(tmp_path, negative):
    ref = build_reference("sdxl-base", seed=31)
    ours = latentforge.load(save_folder(ref, tmp_path / "m"))
    pipe = diffusers_sdxl(ref, D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"), tmp_path)
    pipe.set_progress_bar_config(disable=True)
    # diffusers zeroes the unconditional text only when no negative prompt is given; the original
    # SDXL code (and latentforge) zeroes it for an empty negative prompt
    theirs = pipe(
        PROMPT,
        negative_prompt=negative or None,
        num_inference_steps=8,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    result = ours.txt2img(
        PROMPT,
        negative_prompt=negative,
        steps=8,
        cfg_scale=5.0,
        width=64,
        height=64,
        seed=7,
        sampler="Euler",
        schedule="normal",
    )
    _assert_images_close(result.images, theirs)
