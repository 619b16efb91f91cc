"""The one generate loop: txt2img and img2img differ only in the starting latent and sigmas."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from latentforge.pipelines import hires, tasks
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import CFGDenoiser, ModelDenoiser, NoiseSchedule, get_sigmas, resolve
from latentforge.sampling.noise import BrownianNoise, ImageNoise


class Interrupted(Exception):
    """Raised by a progress callback to stop a generation."""


@dataclass
class Progress:
    """Reported after each denoising step."""

    step: int  # 1-based within this pass
    steps: int
    iteration: int  # 0-based pass index (batch_count)
    iterations: int
    sigma: float
    denoised: Tensor  # current estimate of the clean latents, (B, C, h, w)
    _pipe: object = field(repr=False, default=None)

    @property
    def fraction(self) -> float:
        return (self.iteration + self.step / self.steps) / self.iterations

    def preview(self) -> list[Image.Image]:
        """Cheap RGB previews of the current estimate (a linear map of the latent, no VAE decode)."""
        from latentforge.preview import latent_preview

        return latent_preview(self._pipe, self.denoised)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest  # with the seed actually used
    seconds: float = 0.0


def _sigmas(info, schedule_name: str, schedule: NoiseSchedule, steps: int) -> Tensor:
    if info.discard_penultimate_sigma:  # A1111 does this for DPM2 / DPM2 a / DPM++ 3M SDE
        sigmas = get_sigmas(schedule_name, schedule, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return get_sigmas(schedule_name, schedule, steps)


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """A1111's rule: t_enc = int(min(strength, 0.999) * steps) steps, starting at sigmas[steps - t_enc - 1]."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1 :]


def _sampler_options(req: GenerationRequest) -> dict:
    opts = dict(s_churn=req.s_churn, s_tmin=req.s_tmin, s_tmax=req.s_tmax, s_noise=req.s_noise)
    if req.eta is not None:
        opts["eta"] = req.eta
    return opts


def generate(
    pipe,
    req: GenerationRequest,
    init_images: Sequence[Image.Image | str | Path] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> GenerationResult:
    """Run ``req`` on ``pipe``: txt2img, or img2img when ``init_images`` are given (cycled over the batch)."""
    start = time.perf_counter()
    img2img = init_images is not None
    req.validate(img2img=img2img)
    fam = pipe.family
    images_in = [_open_image(i) for i in init_images] if img2img else []
    if img2img and not images_in:
        raise RequestError("img2img needs at least one init image")
    width = req.width or (images_in[0].width // 8 * 8 if img2img else fam.default_size)
    height = req.height or (images_in[0].height // 8 * 8 if img2img else fam.default_size)
    down = pipe.vae.config.downscale
    if width % down or height % down:
        raise RequestError(f"width and height must be multiples of {down} for {fam.name}, got {width}x{height}")
    latent_shape = (pipe.unet.config.out_channels, height // down, width // down)

    seed = req.seed if req.seed != -1 else secrets.randbelow(2**32)
    n_total = req.batch_size * req.batch_count
    seeds = [seed + i for i in range(n_total)]
    info, schedule_name = resolve(req.sampler, req.schedule)
    schedule = NoiseSchedule.for_family(fam)
    sigmas = _sigmas(info, schedule_name, schedule, req.steps)
    if img2img:
        sigmas = img2img_sigmas(sigmas, req.steps, req.denoising_strength)

    with torch.inference_mode():
        calls_per_step = 2 if info.second_order else 1  # A1111 lays prompt schedules over model calls
        cond, uncond = tasks.conditioning(pipe, req, width, height, req.batch_size, req.steps * calls_per_step)
        model = ModelDenoiser(pipe.unet, schedule, pipe.prediction, quantize_timesteps=req.quantize_timesteps)
        hr = None
        if req.enable_hr and not img2img:
            hr_w, hr_h = hires.target_size(req, width, height)
            hr_steps = req.hr_second_pass_steps or req.steps
            hr_full = _sigmas(info, schedule_name, schedule, hr_steps)
            hr_sigmas = img2img_sigmas(hr_full, hr_steps, req.denoising_strength)
            hr_cond, hr_uncond = tasks.conditioning(pipe, req, hr_w, hr_h, req.batch_size, hr_steps * calls_per_step)
            hr = (hr_sigmas, (latent_shape[0], hr_h // down, hr_w // down), hr_cond, hr_uncond)
        init_latents = None
        if img2img:
            prepared = [tasks.prepare_image(img, width, height, req.resize_mode) for img in images_in]
            tensors = torch.cat([tasks.image_to_tensor(p) for p in prepared]).to(pipe.device)
            init_latents = pipe.vae.encode(tensors).float()
        total = len(sigmas) - 1 + (len(hr[0]) - 1 if hr else 0)

        def run_pass(init, pass_sigmas, shape, c, u, batch_seeds, it, offset):
            """One sampling pass from fresh noise (init None) or from latents noised to the first sigma."""
            noise = ImageNoise(batch_seeds, shape, out_device=pipe.device)
            first = noise.next()
            if init is not None:
                x = init + first * float(pass_sigmas[0]) if req.denoising_strength > 0 else init
            else:
                scale = math.sqrt(1 + float(pass_sigmas[0]) ** 2) if req.sgm_noise_multiplier else float(pass_sigmas[0])
                x = first * scale
            if init is not None and req.denoising_strength == 0:
                return x
            draw = noise
            if info.brownian:
                positive = pass_sigmas[pass_sigmas > 0]
                draw = BrownianNoise(batch_seeds, shape, positive.min(), positive.max(), out_device=pipe.device)

            def callback(i, x_i, sigma, denoised):
                if progress is not None:
                    progress(Progress(offset + i + 1, total, it, req.batch_count, float(sigma), denoised, pipe))

            denoiser = CFGDenoiser(model, c, u, req.cfg_scale)  # prompt schedules restart per pass
            return info.fn(denoiser, x, pass_sigmas, noise=draw, callback=callback, **_sampler_options(req))

        out_images: list[Image.Image] = []
        for it in range(req.batch_count):
            batch_seeds = seeds[it * req.batch_size : (it + 1) * req.batch_size]
            init = None
            if img2img:
                init = init_latents[[(it * req.batch_size + b) % len(images_in) for b in range(req.batch_size)]]
            x = run_pass(init, sigmas, latent_shape, cond, uncond, batch_seeds, it, 0)
            if hr:
                hr_sigmas, hr_shape, hr_cond, hr_uncond = hr
                upscaled = hires.upscale(pipe, x, req.hr_upscaler, hr_shape)
                x = run_pass(upscaled, hr_sigmas, hr_shape, hr_cond, hr_uncond, batch_seeds, it, len(sigmas) - 1)
            out_images.extend(tasks.tensor_to_images(pipe.vae.decode(x)))

    from latentforge.pipelines.metadata import infotexts_for

    final = GenerationRequest(**{**req.to_dict(), "seed": seed, "width": width, "height": height})
    texts = infotexts_for(pipe, final, seeds, info, schedule_name, img2img)
    for image, text, s in zip(out_images, texts, seeds):
        image.info["parameters"] = text
        image.info["latentforge"] = _json_for(pipe, final, s, img2img)
    return GenerationResult(out_images, seeds, texts, final, time.perf_counter() - start)


def _open_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read init image {image}: {e}") from None


def _json_for(pipe, req: GenerationRequest, seed: int, img2img: bool) -> str:
    from latentforge.pipelines.metadata import request_json

    return request_json(pipe, req, seed, img2img)
