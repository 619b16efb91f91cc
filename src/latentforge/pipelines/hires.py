"""A1111's "Hires. fix": txt2img at the requested size, upscaled, then an img2img pass at the larger size.

The second pass uses the same seeds (fresh noise at the new size, A1111's rule), the request's
``denoising_strength`` and ``hr_second_pass_steps`` (0: the same steps): A1111's fixed-steps rule, the
last N steps of a schedule of int(N / strength) (``hires_schedule``).
Prompt editing goes on with the first pass's timeline, as in A1111 1.7+: ``[a:b:when]`` with a step
number counts on from the first pass's steps, a fraction from 1.0 (``1.5``: halfway through the hires
pass; ``0.5`` happened in the first pass), see ``conditioning.schedule.prompt_schedule``.
Upscalers: the latent ones interpolate the latents directly; the image ones decode, resize the
8-bit image and encode again, as A1111 does. An ESRGAN-family model file (``upscalers.py``, by path, or
by name in the upscaler folders given to ``generate``) is an image upscaler too: the network enlarges
the decoded 8-bit image, then Lanczos gives the target size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from latentforge import upscalers
from latentforge.io.tensorfile import CheckpointError
from latentforge.models.esrgan import ImageUpscaler
from latentforge.pipelines import inpaint, networks
from latentforge.pipelines.checks import hires_checkpoint, hires_request, hires_upscaler
from latentforge.pipelines.images import image_to_tensor
from latentforge.pipelines.numerics import decode_checked
from latentforge.pipelines.plan import (
    Pass,
    Plan,
    conditioning,
    fixed_steps,
    fixed_steps_schedule,
    img2img_sigmas,
    pass_sigmas,
)
from latentforge.pipelines.refiner import HandOff, check_family, open_other
from latentforge.pipelines.request import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    GenerationRequest,
    RequestError,
    builtin_upscaler,
    upscaler_name,
)
from latentforge.sampling import ModelDenoiser
from latentforge.sampling.registry import resolve


def target_pixels(req: GenerationRequest, width: int, height: int) -> tuple[int, int]:
    """A1111's size to upscale to before any rounding (``calculate_target_resolution``'s hr_upscale_to):
    width and height times ``hr_scale``, or ``hr_resize_x``/``hr_resize_y`` (one of them keeps the aspect
    ratio; both: the image covers that size, ``crop`` then cuts the rest). An image upscaler's result has
    this size when it is encoded."""
    x, y = req.hires.resize_x, req.hires.resize_y
    if not x and not y:
        return int(width * req.hires.scale), int(height * req.hires.scale)
    if not y:
        return x, x * height // width
    if not x or width / height >= x / y:
        return y * width // height, y
    return x, x * height // width


def crop(req: GenerationRequest, width: int, height: int) -> tuple[int, int]:
    """Latent columns and rows A1111 cuts after upscaling when both ``hr_resize_x`` and ``hr_resize_y`` are
    given (``truncate_x``, ``truncate_y``: the covering size's excess // 8), half on each side."""
    x, y = req.hires.resize_x, req.hires.resize_y
    if not x or not y:
        return 0, 0
    w, h = target_pixels(req, width, height)
    return (w - x) // 8, (h - y) // 8


def target_size(req: GenerationRequest, width: int, height: int) -> tuple[int, int]:
    """The hires pass's size: ``target_pixels`` down to multiples of 8 (its latent's size times 8), less
    ``crop``."""
    cover_w, cover_h = target_pixels(req, width, height)
    cx, cy = crop(req, width, height)
    w, h = (cover_w // 8 - cx) * 8, (cover_h // 8 - cy) * 8
    if w < 64 or h < 64 or w > 8192 or h > 8192:
        raise RequestError(f"hires size {w}x{h} is outside 64 to 8192 pixels")
    if cover_w > 8192 or cover_h > 8192:  # the upscaled image before the crop
        raise RequestError(
            f"hires size {w}x{h} is cut from {cover_w}x{cover_h} (the first pass's aspect ratio), which is over "
            "8192 pixels: give hr_resize_x and hr_resize_y closer to it"
        )
    return w, h


def a1111_resize(image: Image.Image, name: str | ImageUpscaler, w: int, h: int) -> Image.Image:
    """A1111's ``images.resize_image(0, image, w, h, upscaler_name)``: "None" (or no enlargement) is Lanczos
    to (w, h); otherwise ``Upscaler.upscale`` to ``dest`` = the scaled size floored to multiples of 8 (up to
    three of the upscaler's own steps while the image is smaller: the network, or a Lanczos / nearest
    resize by the scale, then Lanczos to ``dest``), and Lanczos to (w, h) when that differs."""
    lanczos = Image.Resampling.LANCZOS
    scale = max(w / image.width, h / image.height)
    if name == "None" or scale <= 1.0:
        return image if image.size == (w, h) else image.resize((w, h), lanczos)
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    for _ in range(3):
        if image.width >= dest[0] and image.height >= dest[1]:
            break
        before = image.size
        if isinstance(name, ImageUpscaler):
            image = upscalers.run(image, name)
        else:  # A1111's UpscalerLanczos / UpscalerNearest: the image times the scale
            image = image.resize((int(image.width * scale), int(image.height * scale)), IMAGE_UPSCALERS[name])
        if image.size == before:
            break
    if image.size != dest:
        image = image.resize(dest, lanczos)
    return image if image.size == (w, h) else image.resize((w, h), lanczos)


def upscale(
    pipe,
    latents: Tensor,
    upscaler: str | ImageUpscaler,
    shape: tuple[int, int, int],
    vae=None,
    pixels=None,
    keep: list | None = None,
) -> Tensor:
    """First-pass latents -> latents of ``shape`` (C, h, w) for the second pass. ``upscaler``: a built-in
    name, or a loaded ESRGAN-family model (``resolve_upscaler``). An image upscaler decodes with ``pipe``'s
    VAE and encodes with ``vae`` (the hires pass's model's; default the same); ``keep`` receives the
    upscaled images it encoded (B, 3, H, W in [-1, 1])."""
    name = upscaler if isinstance(upscaler, ImageUpscaler) else upscaler_name(upscaler)
    size = shape[-2:]
    if not isinstance(name, ImageUpscaler) and name in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[name]
        return F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)
    f = pipe.vae.config.downscale
    decoded = ((decode_checked(pipe.vae.decode, latents).float() + 1) / 2).clamp(0, 1)
    w, h = pixels or (size[1] * f, size[0] * f)  # A1111 encodes the image at the unrounded target size
    vae = vae if vae is not None else pipe.vae
    if (w % f or h % f) and (w // f) * (h // f) > getattr(vae, "auto_tile_above", 0):
        w, h = w // f * f, h // f * f  # tiles need whole latent pixels: the rounded size then
    images = []
    for sample in decoded:
        eight_bit = (255.0 * sample.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)  # truncation, as A1111
        images.append(image_to_tensor(a1111_resize(Image.fromarray(eight_bit), name, w, h)))
    if keep is not None:
        keep.append(torch.cat(images))
    return vae.encode(torch.cat(images).to(next(vae.parameters()).device)).float()


def hires_schedule(sampler, schedule: str, noise_schedule, steps: int, strength: float) -> tuple[Tensor, Tensor]:
    """(the whole schedule, the sigmas that run) of the hires pass as A1111 runs it: ``sample_hr_pass``
    hands ``steps`` to ``sample_img2img``, so ``setup_img2img_steps`` takes its fixed-steps branch (the last
    ``steps`` of ``int(steps / strength)``: plan.py ``fixed_steps``); strength 0: no step runs. The whole
    schedule sets the range of the SDE samplers' Brownian trees, as A1111's ``create_noise_sampler(x,
    sigmas, p)`` is given it."""
    if strength <= 0:
        full = pass_sigmas(sampler, schedule, noise_schedule, steps)
        return full, img2img_sigmas(full, steps, strength)
    full = pass_sigmas(sampler, schedule, noise_schedule, fixed_steps_schedule(steps, strength))
    return full, fixed_steps(full, steps)


def resolve_upscaler(name: str, dirs: Sequence[str | Path] | None, device: torch.device | str) -> str | ImageUpscaler:
    """A built-in upscaler's name, or the ESRGAN-family model of that name or path loaded from ``dirs``."""
    known = builtin_upscaler(name)
    if known is not None:
        return known
    try:
        return upscalers.load(name, dirs or (), device=device)
    except (upscalers.UpscalerNotFound, CheckpointError) as e:
        raise RequestError(f"hr_upscaler: {e}") from None


def pass_calls(req: GenerationRequest) -> tuple[int, int]:
    """(model calls of the first pass, of the hires pass): the steps over which A1111 lays out each
    pass's prompt schedules (second-order samplers call the model twice a step)."""
    sampler, _ = resolve(req.sampler, req.schedule)
    second = hires_request(req)
    hires_sampler, _ = resolve(second.sampler, second.schedule)
    steps = req.hires.second_pass_steps or req.steps
    return req.steps * (2 if sampler.second_order else 1), steps * (2 if hires_sampler.second_order else 1)


def prepare(pipe, req: GenerationRequest) -> HandOff | None:
    """The hires pass's other model (A1111's hr_checkpoint_name), checked before any work: its family is
    read from names and shapes. A latent upscaler hands it the first pass's latents as they are, so it must
    share their latent space (``refiner.check_family``); image upscalers decode with this model's VAE and
    encode with its. None: the hires pass runs this model."""
    given = hires_checkpoint(req.hires) if req.hires is not None else None
    if given is None or given is pipe:  # this very pipeline: no other model (A1111 writes no field then)
        return None
    if req.control:
        raise RequestError(
            "ControlNet units with another model for the hires pass (hr_checkpoint_name) are not available; "
            "leave one of them out"
        )
    hand = open_other(pipe, given, "hr_checkpoint_name")
    if builtin_upscaler(hires_upscaler(req.hires)) in LATENT_UPSCALERS:
        check_family(pipe.family, hand.family, hand.name, "hr_checkpoint_name")
    hand.request = req  # as given (with its network tags): they are applied to the other model too
    return hand


def add_pass(
    plan: Plan,
    pipe,
    req: GenerationRequest,
    upscaler_dirs: Sequence[str | Path] | None = None,
    other: HandOff | None = None,
) -> Pass:
    """Append the hires pass to a txt2img plan: the previous pass's latents upscaled to the target size,
    then img2img over ``hr_second_pass_steps`` (or ``steps``) with the request's denoising strength, and
    the hires pass's own prompts, sampler and schedule where the request gives them (``hires_request``).
    ``upscaler_dirs``: the folders where an upscaler model named by the request is looked up. ``other``
    (``prepare``): another model runs the hires pass, loaded here, with the request's networks applied
    (``other.session``, closed by the caller), its own conditioning and noise schedule; its VAE encodes
    the upscaled image and decodes the result, as A1111 switches models before the hires pass."""
    first = plan.passes[-1]
    width, height = target_size(req, plan.width, plan.height)
    pixels = target_pixels(req, plan.width, plan.height)
    steps = req.hires.second_pass_steps or req.steps
    second = hires_request(req)
    sampler, schedule = resolve(second.sampler, second.schedule)
    runner, model = pipe, first.model
    if other is not None:
        runner = other.loaded = other.load()
        if other.opened:
            runner.folders = pipe.folders  # a checkpoint loaded here finds networks where this one does
        other.session = networks.activate(runner, other.request)
        model = ModelDenoiser(
            runner.unet, runner.noise_schedule(), runner.prediction, quantize_timesteps=req.quantize_timesteps
        )
    full, sigmas = hires_schedule(sampler, schedule, model.schedule, steps, req.denoising_strength)
    first_calls, calls = pass_calls(req)
    # A1111 1.7+: the hires pass's prompt editing goes on from the first pass's timeline
    cond, uncond = conditioning(runner, second, width, height, req.batch_size, calls, first_pass_calls=first_calls)
    down = runner.vae.config.downscale
    shape = (first.shape[0] if other is None else runner.unet.config.out_channels, height // down, width // down)
    upscaler = resolve_upscaler(hires_upscaler(req.hires), upscaler_dirs, pipe.device)

    cx, cy = crop(req, plan.width, plan.height)
    covering = (*shape[:-2], shape[-2] + cy, shape[-1] + cx)

    weight = req.inpainting_mask_weight if runner.family.conditioner.kind == "inpaint" else 1
    concat: list[Tensor | None] = [None]  # an inpainting model's channels from this batch's upscaled image

    def start(iteration: int, previous: Tensor | None, seeds: list[int]) -> Tensor:
        keep: list[Tensor] = []
        latents = upscale(pipe, previous, upscaler, covering, runner.vae, pixels, keep=keep if weight < 1 else None)
        if weight < 1:  # A1111 decodes a latent upscaler's latents for this
            image = keep[0] if keep else decode_checked(runner.vae.decode, latents).float()
            concat[0] = inpaint.unmasked_concat(runner, image, weight)
        rows, cols = latents.shape[-2:]  # A1111: samples[:, :, ty//2 : H - (ty+1)//2, tx//2 : W - (tx+1)//2]
        window = (..., slice(cy // 2, rows - (cy + 1) // 2), slice(cx // 2, cols - (cx + 1) // 2))
        if concat[0] is not None:
            concat[0] = concat[0][window]
        return latents[window]

    if other is not None:
        plan.decode = runner.vae.decode
    hires_pass = Pass(
        "hires",
        model,
        sampler,
        sigmas,
        shape,
        cond,
        uncond,
        req.cfg_scale,
        start,
        denoise=req.denoising_strength > 0,
        cfg_rescale=first.cfg_rescale,
        min_uncond_sigma=first.min_uncond_sigma,
        min_uncond_all=first.min_uncond_all,
        sampler_options=first.sampler_options,
        batch_concat=(lambda iteration, seeds: concat[0]) if weight < 1 else None,
    )
    if sampler.brownian:  # the trees span the whole schedule, not only the steps that run
        positive = full[full > 0]
        hires_pass.noise_range = (float(positive.min()), float(full.max()))
    plan.passes.append(hires_pass)
    return hires_pass
