"""The one generate loop: a request becomes a plan of passes (plan.py), and each batch runs them in order."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from latentforge import allocator
from latentforge.nn import packed
from latentforge.nn.circular import circular_padding
from latentforge.nn.packed import packed_session
from latentforge.pipelines import control, depth, fewer_flops, hires, inpaint, networks, refiner, upscale_x4
from latentforge.pipelines.checks import MAX_SIDE
from latentforge.pipelines.images import (
    flatten_image,
    image_to_tensor,
    open_image,
    prepare_image,
    tensor_to_images,
)
from latentforge.pipelines.infotext_fields import infotexts_for
from latentforge.pipelines.metadata import request_json
from latentforge.pipelines.numerics import FiniteWatch, decode_checked
from latentforge.pipelines.plan import Pass, Plan, first_pass, noise_options, starting_latent
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import resolve
from latentforge.sampling.noise import COMFY_BATCH, BrownianNoise, ImageNoise
from latentforge.threads import auto_threads

# convolution weights packed once per generation (nn.packed.packed_session) for UNets at least this big:
# full-size models on the CPU (measured in benchmarks/bench_packed.py); tiny ones keep PyTorch's path
PACK_MIN_UNET_PARAMS = 100_000_000


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


def build_plan(
    pipe,
    req: GenerationRequest,
    init_images: list[Image.Image] | None,
    hand_off: refiner.HandOff | None = None,
    upscaler_dirs: Sequence[str | Path] | None = None,
    hires_model: refiner.HandOff | None = None,
) -> Plan:
    """The passes a request asks for: txt2img or img2img (with a mask: inpainting; or the x4 upscaler's
    pass), then the passes of its option groups (hires; the refiner's hand-off, checked beforehand by
    ``refiner.prepare``). ``upscaler_dirs``: folders of upscaler models that a hires upscaler may name;
    ``hires_model``: the hires pass's other model (``hires.prepare``)."""
    if req.x4 is not None:
        return upscale_x4.build_plan(pipe, req, init_images or [])
    fam = pipe.family
    inpainting = req.inpaint is not None and init_images
    protect = None
    if inpainting and any(req.inpaint.outpaint):
        init_images, protect = inpaint.outpaint_request(init_images, req.inpaint)
        req = dataclasses.replace(req, inpaint=dataclasses.replace(req.inpaint, mask=protect))
    width, height = output_size(req, init_images[0] if init_images else None, fam.default_size)
    down = pipe.vae.config.downscale
    if width % down or height % down:
        raise RequestError(f"width and height must be multiples of {down} for {fam.name}, got {width}x{height}")
    info, schedule_name = resolve(req.sampler, req.schedule)
    if req.depth is not None and fam.conditioner.kind != "depth":
        raise RequestError(f"a depth map was given, but {fam.name} is not a depth-to-image model (sd2-depth)")
    init_latents = job = concat = None
    if inpainting:
        job = inpaint.prepare(init_images, req.inpaint, width, height, req.resize_mode, down, protect)
        init_images = job.images
        if fam.conditioner.concat_channels:
            concat = inpaint.model_concat(pipe, job, req.inpainting_mask_weight)
    if init_images and req.resize_mode == LATENT_RESIZE:
        if fam.conditioner.kind == "depth":
            raise RequestError(
                "resize_mode 3 (just resize, latent upscale) is not available for depth-to-image models: the depth "
                "map is made from the image in pixels; use resize_mode 0, 1 or 2"
            )
        init_latents = latent_resized(pipe, init_images, width, height)
    elif init_images:
        prepared = [prepare_image(img, width, height, req.resize_mode) for img in init_images]
        pixels = torch.cat([image_to_tensor(p) for p in prepared])
        init_latents = pipe.vae.encode(pixels.to(pipe.device)).float()
        if job is None:  # an inpainting model without a mask: the init images, cleared by the mask weight
            concat = inpaint.unmasked_concat(pipe, pixels, req.inpainting_mask_weight)
        if fam.conditioner.kind == "depth":  # depth-to-image: the depth of the (first) init image
            if len(prepared) != 1:
                raise RequestError(f"depth-to-image takes one init image, got {len(prepared)}")
            concat = depth.depth_concat(pipe, req.depth, prepared[0], width, height)
    first = first_pass(pipe, req, info, schedule_name, width, height, init_latents, concat)
    plan = Plan([first], width, height, pipe.vae.decode, info, schedule_name, noise_options(req, down))
    plan.infotext.update(inpaint.conditioning_infotext(pipe, req))  # inpainting models: A1111's mask weight
    if job is not None:
        inpaint.apply(plan, first, job, init_latents, pipe, req.inpaint)
    if req.hires is not None and init_images is None:
        hires.add_pass(plan, pipe, req, upscaler_dirs, hires_model)
    if hand_off is not None:
        refiner.add_pass(plan, pipe, req, hand_off)
    return plan


LATENT_RESIZE = 3  # A1111's img2img resize mode "Just resize (latent upscale)"


def latent_resized(pipe, images: Sequence[Image.Image], width: int, height: int) -> Tensor:
    """A1111's resize mode 3, "Just resize (latent upscale)": each init image is encoded at its own size (no
    resize in pixels), then its latent is resized bilinearly to the output's latent size
    (``interpolate(init_latent, size=(height // f, width // f), mode="bilinear")``). Sides that are not
    multiples of the VAE's factor f are floored by the encoder as by diffusers' and A1111's; an image large
    enough to be encoded in tiles is first cut to multiples of f (from its top left), as tiles need."""
    down = pipe.vae.config.downscale
    size = (height // down, width // down)
    tiled_above = getattr(pipe.vae, "auto_tile_above", 0)
    latents = []
    for image in images:
        flat = flatten_image(image).convert("RGB")
        w, h = flat.size
        if (w % down or h % down) and (w // down) * (h // down) > tiled_above:
            flat = flat.crop((0, 0, w // down * down, h // down * down))
        if flat.width < down or flat.height < down:
            raise RequestError(f"an init image of {w}x{h} pixels is too small to encode (at least {down}x{down})")
        latent = pipe.vae.encode(image_to_tensor(flat).to(pipe.device)).float()
        latents.append(torch.nn.functional.interpolate(latent, size=size, mode="bilinear"))
    return torch.cat(latents)


def work_size(pipe, req: GenerationRequest, init_images: Sequence[Image.Image] | None) -> float:
    """UNet parameters x latent pixels x batch: the measure of a generation's size that chooses its
    thread count (``threads.auto_threads``)."""
    first = init_images[0] if init_images else None  # an estimate only: the size is checked where it is used
    width = req.width or (first.width if first else pipe.family.default_size)
    height = req.height or (first.height if first else pipe.family.default_size)
    return float(unet_params(pipe)) * (width // 8) * (height // 8) * req.batch_size


def unet_params(pipe) -> int:
    return pipe.cached("unet_params", lambda: packed.numel(pipe.unet))  # weights left packed counted too


def packing(pipe):
    """``packed_session`` on the UNet for full-size generations on the CPU (no offloading), unless
    ``LATENTFORGE_PACK=0``; otherwise nothing."""
    off = os.environ.get("LATENTFORGE_PACK", "1").strip().lower() in ("0", "off", "no", "false")
    if off or pipe.device.type != "cpu" or pipe.offloader is not None or unet_params(pipe) < PACK_MIN_UNET_PARAMS:
        return contextlib.nullcontext(0)
    # a sampler's steps (nn/winograd.py); the packed weights kept for the next generation (nn/packed.py)
    return packed_session(pipe.unet, repeated=True, keep=True)


def with_default_cfg(pipe, req: GenerationRequest) -> GenerationRequest:
    """The request with ``cfg_scale`` filled in when it is None: the sampler's default, else the model
    family's (``Family.default_cfg``); the record and infotext then carry the number used."""
    if req.cfg_scale is not None:
        return req
    info, _ = resolve(req.sampler, req.schedule)
    default = info.default_cfg if info.default_cfg is not None else pipe.family.default_cfg
    return dataclasses.replace(req, cfg_scale=default)


def output_size(req: GenerationRequest, init_image: Image.Image | None, default: int) -> tuple[int, int]:
    """The output size: the request's, else the init image's rounded down to multiples of 8 (A1111),
    else ``default``. A size taken from an image obeys the same limits as an explicit one."""
    width = req.width or (init_image.width // 8 * 8 if init_image else default)
    height = req.height or (init_image.height // 8 * 8 if init_image else default)
    if init_image and not (64 <= width <= MAX_SIDE and 64 <= height <= MAX_SIDE):
        raise RequestError(
            f"the output size {width}x{height} taken from the init image ({init_image.width}x"
            f"{init_image.height}) is outside 64 to {MAX_SIDE} pixels a side; choose the output size "
            "with width= and height= (--width/--height)"
        )
    return width, height


def run_pass(
    p: Pass,
    previous: Tensor | None,
    iteration: int,
    seeds: list[int],
    subseeds: list[int],
    noise_opts,
    device,
    callback,
    stream=None,
) -> tuple[Tensor, object]:
    """One sampling pass for one batch: its starting latent, its noise (per-image seeded, or Brownian
    trees for the SDE samplers; a continuing pass keeps drawing from the previous pass's ``stream``), its
    sampler over its sigmas. Returns the latents and the noise stream. NaN/Inf in the denoised latents of
    any step or in the result raise ``NonFiniteError`` naming the pass and step (pipelines/numerics.py)."""
    watch = FiniteWatch(p, getattr(getattr(p.model, "unet", None), "dtype", None))  # x4: a tiled model
    init = p.start(iteration, previous, seeds)
    if p.continues and stream is not None:
        draw = stream
        x = starting_latent(p, init, None)
    else:
        noise = ImageNoise(seeds, p.shape, subseeds=subseeds, options=noise_opts, out_device=device)
        x = starting_latent(p, init, noise.next())
        draw = noise
        if p.sampler.brownian:
            positive = p.sigmas[p.sigmas > 0]
            lo, hi = p.noise_range or (positive.min(), positive.max())
            whole_batch = noise_opts is not None and noise_opts.source == COMFY_BATCH
            draw = BrownianNoise(seeds, p.shape, lo, hi, out_device=device, whole_batch=whole_batch)
    if init is not None and not p.denoise:
        return watch.result(x), draw
    for prepare in p.before_batch:
        prepare(iteration, seeds)
    concat = p.batch_concat(iteration, seeds) if p.batch_concat is not None else None
    checked = watch.callback(callback)
    # freed blocks reused between the steps on the CPU (their activations are the same every step), from
    # the end of the first step (which packs weights and makes filters: those stay off the kept heap) until
    # the sampler ends, before the decode (latentforge/allocator.py)
    reuse, reusing = contextlib.ExitStack(), []

    def step(*args) -> None:
        if x.device.type == "cpu" and not reusing:  # the first step's end
            reusing.append(reuse.enter_context(allocator.reusing("steps")))
        checked(*args)

    try:
        with reuse:
            out = p.sampler.fn(p.denoiser(concat), x, p.sigmas, noise=draw, callback=step, **p.sampler_options)
    except Interrupted:
        watch.flush()  # a NaN in a step whose check was still pending wins over the interruption
        raise
    return watch.result(out if p.finish is None else p.finish(out)), draw


def generate(
    pipe,
    req: GenerationRequest,
    init_images: Sequence[Image.Image | str | Path] | None = None,
    progress: Callable[[Progress], None] | None = None,
    upscaler_dirs: Sequence[str | Path] | None = None,
    partial: bool = False,
) -> GenerationResult:
    """Run ``req`` on ``pipe``: txt2img, or img2img when ``init_images`` are given (cycled over the batch);
    with ``req.x4`` the images are the x4 upscaler's low-res inputs. ``upscaler_dirs``: folders of
    ESRGAN-family models (``upscalers.search_dirs``) for ``hr_upscaler``. When ``progress`` raises
    ``Interrupted`` the run stops; with ``partial`` it returns the batch being made as A1111 does (its last
    denoised estimate, decoded; later passes and batches left out) instead of raising."""
    start = time.perf_counter()
    img2img = init_images is not None
    x4 = req.x4 is not None
    req.validate(img2img=img2img and not x4, upscaler_files=bool(upscaler_dirs))
    req = with_default_cfg(pipe, req)
    if x4 and req.control:
        raise RequestError("ControlNet units cannot control the x4 upscaler; remove 'control' or 'x4'")
    if x4 and not init_images:
        raise RequestError("the x4 upscaler needs a low-resolution image (none was given)")
    images_in = [open_image(i) for i in init_images] if img2img else None
    if img2img and not images_in:
        raise RequestError("img2img needs at least one init image")
    if img2img and not x4 and len(images_in) > 1:  # A1111's img2img init: one image serves the whole batch,
        if len(images_in) > req.batch_size:  # several make the batch (at most batch_size of them)
            raise RequestError(
                f"got {len(images_in)} init images for a batch_size of {req.batch_size}: give at most batch_size "
                "images (one image serves the whole batch), as A1111"
            )
        req = dataclasses.replace(req, batch_size=len(images_in))
    hand_off = refiner.prepare(pipe, req) if req.refiner is not None else None
    hires_model = hires.prepare(pipe, req) if not img2img else None  # (hires is txt2img's)
    if req.hires is not None and hires_model is None and req.hires.checkpoint is pipe:  # itself: no other model
        req = dataclasses.replace(req, hires=dataclasses.replace(req.hires, checkpoint=""))
    size = output_size(req, images_in[0] if images_in else None, pipe.family.default_size) if req.control else None
    control_units = control.prepare(pipe, req, images_in, size)  # ControlNets loaded, images preprocessed

    seed, subseed, seeds, subseeds = pick_seeds(req, req.batch_size * req.batch_count)
    out_images: list[Image.Image] = []
    session = networks.activate(pipe, req)  # LoRAs and embeddings for this request only
    try:
        threads = auto_threads(work_size(pipe, req, images_in), pipe.device.type)
        # tiling (A1111's): the UNet's and VAE's convolutions pad circularly for the whole run, also the
        # img2img encode and the hires pass; ControlNets and text encoders do not (nn/circular.py)
        tiling = circular_padding(req.tiling, pipe.unet, pipe.vae)
        with torch.inference_mode(), threads, tiling as circular, packing(pipe):
            plan = build_plan(pipe, session.request, images_in, hand_off, upscaler_dirs, hires_model)
            for other in (hand_off, hires_model):  # the refiner, the hires pass's model: loaded by the plan
                if other is not None and other.loaded is not None:
                    circular.add(other.loaded.unet, other.loaded.vae)
            control.apply(plan, pipe, control_units)
            plan.infotext.update(session.infotext)
            others = [hires_model.loaded] if hires_model is not None else []
            fewer_flops.apply(plan, pipe, session.request, img2img, others)  # DeepCache, token merging: hooks
            _run(pipe, plan, session.request, seeds, subseeds, progress, out_images, partial)
    finally:
        fewer_flops.remove(pipe)
        session.close(pipe)
        if hires_model is not None and hires_model.loaded is not None:
            fewer_flops.remove(hires_model.loaded)
            if hires_model.session is not None:
                hires_model.session.close(hires_model.loaded)

    mode = "upscale-x4" if x4 else "img2img" if img2img else "txt2img"
    if hires_model is not None:  # the record names the model's source, also when a loaded pipeline was given
        req = dataclasses.replace(req, hires=dataclasses.replace(req.hires, checkpoint=hires_model.name))
    refiner_name = hand_off.name if hand_off is not None else None
    return finish_result(pipe, req, plan, mode, seeds, (seed, subseed), out_images, start, refiner_name)


def pick_seeds(req: GenerationRequest, count: int) -> tuple[int, int, list[int], list[int]]:
    """The run's seed and subseed (-1: random) and those of its ``count`` images, as A1111 (processing.py
    ``all_seeds``, ``all_subseeds``): image i has seed + i; with variation seeds (``subseed_strength``) every
    image has the seed itself and subseed + i, so the variations are of one image."""
    seed = req.seed if req.seed != -1 else secrets.randbelow(2**32)
    subseed = req.subseed if req.subseed != -1 or not req.subseed_strength else secrets.randbelow(2**32)
    step = 0 if req.subseed_strength else 1
    return seed, subseed, [seed + i * step for i in range(count)], [subseed + i for i in range(count)]


def finish_result(
    pipe,
    req: GenerationRequest,
    plan: Plan,
    mode: str,
    seeds: list[int],
    chosen: tuple[int, int],
    images: list[Image.Image],
    start: float,
    refiner_name: str | None = None,
) -> GenerationResult:
    """The result of a run: each image with its A1111 infotext and JSON record. ``chosen``: the seed and
    subseed actually used; ``start``: the run's ``perf_counter`` at its beginning."""
    # the record keeps the prompt as written (with its network tags), as A1111's infotext does
    final = dataclasses.replace(req, seed=chosen[0], subseed=chosen[1], width=plan.width, height=plan.height)
    if refiner_name is not None:  # the record names the refiner's source, also when a loaded pipeline was given
        final.refiner = dataclasses.replace(req.refiner, checkpoint=refiner_name)
    seeds = seeds[: len(images)]  # fewer when an interrupted run returned what it had
    refined = any(p.name == "refiner" for p in plan.passes)  # (no pass when the switch falls after the last step)
    texts = infotexts_for(pipe, final, seeds, plan.sampler, mode, plan.infotext, refined)
    for i, (image, text) in enumerate(zip(images, texts)):
        image.info["parameters"] = text
        image.info["latentforge"] = request_json(pipe, final, i, mode)
    return GenerationResult(images, seeds, texts, final, time.perf_counter() - start)


def _run(pipe, plan: Plan, req: GenerationRequest, seeds, subseeds, progress, out_images, partial=False):
    """Every batch through every pass of the plan, decoded (and post-processed) into ``out_images``. With
    ``partial``, an ``Interrupted`` from ``progress`` ends the run with the current batch's last denoised
    estimate decoded (post-processed only when it came from the last pass), as A1111's interrupt and skip."""
    total = plan.total_steps
    for it in range(req.batch_count):
        batch = slice(it * req.batch_size, (it + 1) * req.batch_size)
        batch_seeds = seeds[batch]
        x, offset, stream, last = None, 0, None, [None]
        for k, p in enumerate(plan.passes):

            def callback(i, x_i, sigma, denoised, offset=offset, it=it, last=last):
                last[0] = denoised
                if progress is not None:
                    progress(Progress(offset + i + 1, total, it, req.batch_count, float(sigma), denoised, pipe))

            try:
                x, stream = run_pass(p, x, it, batch_seeds, subseeds[batch], plan.noise, pipe.device, callback, stream)
            except Interrupted:
                if not partial or last[0] is None:
                    raise
                images = tensor_to_images(decode_checked(plan.decode, last[0]), plan.finish_pixels)
                final = k == len(plan.passes) - 1 and plan.postprocess
                out_images.extend(plan.postprocess(images, it) if final else images)
                return
            offset += p.steps
        images = tensor_to_images(decode_checked(plan.decode, x), plan.finish_pixels)
        out_images.extend(plan.postprocess(images, it) if plan.postprocess else images)
