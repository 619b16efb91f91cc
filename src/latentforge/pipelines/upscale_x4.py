"""The Stable Diffusion x4 upscaler task: a low-resolution image and a prompt become an image 4x larger.

The model (``sd-x4-upscaler``, v-prediction, f=4 VAE with scale 0.08333) denoises a latent at the
low-res image's own size; the low-res image in [-1, 1], noised to ``noise_level`` with the DDPM schedule
of betas 0.0001 .. 0.02 (``UpscaleConditioner.noise_augment``), is concatenated after the scaled latent
on both CFG sides, and the level is the UNet's class label, as in diffusers' StableDiffusionUpscalePipeline
and the original ``ImageConcatWithNoiseAugmentation``. The augmentation noise of image i comes from a CPU
generator seeded with its seed - 10 (ComfyUI's choice), so it is independent of the starting noise.

Large inputs are denoised in overlapping latent tiles at every step, blended linearly (``TiledModel``,
the MultiDiffusion scheme of Bar-Tal et al. 2023 over ``nn/tiling.py``): memory is that of one tile, and
the VAE decodes in tiles of its own. With ``tiling`` (seamless images) both go round the edges.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from latentforge.nn.tiling import tiled_apply
from latentforge.pipelines.images import image_to_tensor, prepare_image
from latentforge.pipelines.plan import Pass, Plan, conditioning, pass_sigmas, sampler_options
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import ModelDenoiser, NoiseSchedule, resolve
from latentforge.sampling.denoisers import Cond
from latentforge.sampling.noise import seed_bits

MAX_INPUT = 2048  # low-res pixels per side: the output is at most 8192, the request's limit
AUTO_TILE_ABOVE = 256  # automatic tiling when a side of the input (= the latent) is larger
AUTO_TILE = 192  # latent pixels per tile when tiling automatically
SEED_OFFSET = -10  # the augmentation noise's seed relative to the image's seed (ComfyUI's choice)


def input_size(pipe, req: GenerationRequest, image: Image.Image) -> tuple[int, int]:
    """The low-res (= latent) size: a quarter of ``width``/``height`` when given, else the image's size
    rounded down to what the UNet can take (the image is fitted to it with the request's ``resize_mode``,
    as img2img does); checked against the limits before any work."""
    multiple = 2 ** (len(pipe.unet.config.channel_mult) - 1)
    if req.width or req.height:
        w = (req.width or image.width * 4) // 4
        h = (req.height or image.height * 4) // 4
        if w % multiple or h % multiple or (req.width or 0) % 4 or (req.height or 0) % 4:
            raise RequestError(
                f"x4 output size {w * 4}x{h * 4} must be a multiple of {4 * multiple} pixels "
                f"(the input, a quarter of it, a multiple of {multiple})"
            )
    else:
        w, h = image.width // multiple * multiple, image.height // multiple * multiple
    if w < multiple or h < multiple:
        raise RequestError(f"x4 input image {image.width}x{image.height} is smaller than {multiple} pixels")
    if w > MAX_INPUT or h > MAX_INPUT:
        raise RequestError(
            f"x4 input image {w}x{h} is larger than {MAX_INPUT} pixels per side (the output would exceed "
            f"{4 * MAX_INPUT}); downscale it or upscale a crop"
        )
    return w, h


def tile_size(tile: int | None, w: int, h: int) -> int:
    """Latent pixels per tile: ``tile`` (0 never), or automatic for inputs above AUTO_TILE_ABOVE."""
    if tile is None:
        return AUTO_TILE if max(w, h) > AUTO_TILE_ABOVE else 0
    return tile


class TiledModel:
    """A model denoiser evaluated over overlapping latent tiles (with the matching crop of the extra input
    channels), blended linearly in the overlaps at every call: MultiDiffusion (Bar-Tal et al. 2023)."""

    def __init__(self, model: ModelDenoiser, tile: int, overlap: int, wrap: bool = False):
        self.model, self.tile, self.overlap, self.wrap = model, tile, overlap, wrap  # wrap: tiling's tiles go round
        self.schedule, self.prediction = model.schedule, model.prediction

    def __call__(self, x: Tensor, sigma, cond: Cond) -> Tensor:
        c = x.shape[1]
        joined = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], dim=1)

        def run(piece: Tensor) -> Tensor:
            extra = piece[:, c:] if cond.concat is not None else None
            return self.model(piece[:, :c], sigma, Cond(cond.context, cond.vector, extra))

        return tiled_apply(run, joined, self.tile, self.overlap, wrap=self.wrap).to(x.dtype)


def low_res_inputs(pipe, low_res: Tensor, noise_level: int, batch: int):
    """iteration, seeds -> the batch's noised low-res images (B, 3, h, w): inputs cycled over the batch,
    each noised with its own generator (seed - 10)."""
    conditioner = pipe.family.conditioner

    def concat(iteration: int, seeds: list[int]) -> Tensor:
        picked = low_res[[(iteration * batch + b) % len(low_res) for b in range(batch)]]
        noise = torch.stack(
            [
                torch.randn(picked.shape[1:], generator=torch.Generator().manual_seed(seed_bits(int(s) + SEED_OFFSET)))
                for s in seeds
            ]
        )
        return conditioner.noise_augment(picked, noise_level, noise).to(pipe.device)

    return concat


def build_plan(pipe, req: GenerationRequest, images: list[Image.Image]) -> Plan:
    """The one pass of the x4 upscaler over ``images`` (cycled over the batch)."""
    fam = pipe.family
    if fam.conditioner.kind != "x4":
        raise RequestError(
            f"the x4 upscale task needs an sd-x4-upscaler model; the loaded model is {fam.name} ({fam.title})"
        )
    if not images:
        raise RequestError("the x4 upscaler needs a low-resolution image")
    if req.hires is not None:
        raise RequestError("Hires. fix does not apply to the x4 upscaler; leave enable_hr/hires unset")
    w, h = input_size(pipe, req, images[0])
    opts = req.x4
    info, schedule_name = resolve(req.sampler, req.schedule)
    prepared = [prepare_image(img, w, h, req.resize_mode) for img in images]
    low_res = torch.cat([image_to_tensor(p) for p in prepared])  # (N, 3, h, w) in [-1, 1]
    schedule = NoiseSchedule.for_family(fam)
    sigmas = pass_sigmas(info, schedule_name, schedule, req.steps)
    calls = req.steps * (2 if info.second_order else 1)
    inputs = {"noise_level": opts.noise_level}
    cond, uncond = conditioning(pipe, req, 4 * w, 4 * h, req.batch_size, calls, inputs=inputs)
    model = ModelDenoiser(pipe.unet, schedule, pipe.prediction, quantize_timesteps=req.quantize_timesteps)
    tile = tile_size(opts.tile, w, h)
    if tile and (w > tile or h > tile):
        model = TiledModel(model, tile, min(opts.tile_overlap, tile // 16 * 8), wrap=req.tiling)
    p = Pass(
        "upscale-x4",
        model,
        info,
        sigmas,
        (pipe.unet.config.out_channels, h, w),
        cond,
        uncond,
        req.cfg_scale,
        _no_start,
        sgm_noise=req.sgm_noise_multiplier,
        sampler_options=sampler_options(req),
        batch_concat=low_res_inputs(pipe, low_res, opts.noise_level, req.batch_size),
    )
    return Plan([p], 4 * w, 4 * h, pipe.vae.decode, info, schedule_name)


def _no_start(iteration: int, previous: Tensor | None, seeds: list[int]) -> None:
    return None
