"""Inpainting and outpainting (A1111's img2img inpaint): the mask, the init image, the latent blend and the
final overlay, for inpainting models (9 input channels) and ordinary models alike.

The steps follow A1111's img2img processing:
1. The mask: white = repaint. An RGBA mask with transparency uses its alpha channel (thresholded at
   128; as it is when ``mask_round`` is off), anything else its grey level; ``inpainting_mask_invert``
   swaps the sides; ``mask_blur_x/y`` blur it with a Gaussian of kernel 2 * int(2.5 * sigma + 0.5) + 1
   (OpenCV's GaussianBlur, reflect-101 borders), first along x, then along y.
2. "Whole picture": image and mask are fitted to the output size with the request's resize mode, and
   the overlay mask is the blurred mask doubled (clipped at 255). "Only masked" (``inpaint_full_res``):
   the mask's bounding box, grown by the padding and then to the output's aspect ratio, is cut out of
   the image and the mask, processed at the output size, and pasted back. An empty mask there makes
   the run a plain img2img of the whole picture (no mask, no overlay), as A1111 does. The init image
   is flattened onto white first (A1111's ``images.flatten``: an RGBA image's transparency shows white).
3. Masked content: "original" keeps the image; "fill" replaces the masked area by blurred surrounding
   colours before encoding; "latent noise" replaces it in latent space by the image's own seeded noise;
   "latent nothing" by zeros (A1111 draws that noise once per run, from the first batch's seeds, and
   every batch reuses it).
4. Sampling holds the unmasked latents to A1111's ``init_latent`` (the init latents after the masked
   content above): each denoised estimate is blended, ``denoised = init * keep + denoised * repaint``
   with the mask at latent size (resized, rounded unless ``mask_round`` is off), through every pass that
   continues the sampling (the refiner's), and the final latents once after the last of them. Inpainting
   models also get the mask (rounded unless ``mask_round`` is off) and the latent of the image with the
   masked area cleared (``lerp(image, image * (1 - mask), weight)``, A1111's "conditional mask weight")
   as their 5 extra input channels.
5. The decoded image is pasted over by the original wherever the overlay mask is 0, so unmasked pixels
   are unchanged byte for byte.

Outpainting extends the canvas by given amounts (the new area starts as the edge pixels stretched
outwards), masks exactly the new area and inpaints it; the original pixels are never repainted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageChops, ImageFilter, ImageOps
from torch import Tensor

from latentforge.pipelines.images import BACKGROUND, image_to_tensor, open_image, prepare_image
from latentforge.pipelines.plan import Pass, Plan
from latentforge.pipelines.request import INPAINT_FILL, InpaintOptions, RequestError
from latentforge.sampling.noise import ImageNoise, NoiseOptions

EMPTY_MASK = 'Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.'  # A1111's


def flatten(image: Image.Image) -> Image.Image:
    """A1111's ``images.flatten`` of an init image: an RGBA image is laid over the background colour (white,
    A1111's default ``img2img_background_color``; images.py's rule), then RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGBA":
        base = Image.new("RGBA", image.size, BACKGROUND)
        base.paste(image, mask=image)
        image = base
    return image.convert("RGB")


def binary_mask(mask: Image.Image, round: bool = True) -> Image.Image:
    """A1111's ``create_binary_mask``: the alpha channel of an RGBA image that has transparency
    (thresholded at 128 when ``round``, else as it is), else the grey level (mode L)."""
    mask = ImageOps.exif_transpose(mask)
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round else alpha
    return mask.convert("L")


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: OpenCV's 8-bit Gaussian blur along x, then along y, each with a kernel of
    2 * int(2.5 * sigma + 0.5) + 1 pixels (OpenCV rounds in fixed point, so it is used itself)."""
    import cv2

    arr = np.asarray(mask.convert("L"))
    if blur_x > 0:
        arr = cv2.GaussianBlur(arr, (2 * int(2.5 * blur_x + 0.5) + 1, 1), blur_x)
    if blur_y > 0:
        arr = cv2.GaussianBlur(arr, (1, 2 * int(2.5 * blur_y + 0.5) + 1), blur_y)
    return Image.fromarray(np.ascontiguousarray(arr), "L")


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" region: the bounding box of the mask's nonzero pixels grown by ``padding``
    (within the image), then grown along one axis to the aspect ratio of the output (width x height),
    shifted back inside the image. None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    w, h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, w), min(box[3] + padding, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow(y1, y2, grow, h)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow(x1, x2, grow, w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, grow: int, limit: int) -> tuple[int, int]:
    a -= grow // 2
    b += grow - grow // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the surrounding colours, by compositing ever less
    blurred copies of the image with the masked area made transparent (radii 256, 64, 16, 4, 2, 0)."""
    keep = ImageOps.invert(mask.convert("L"))
    visible = Image.new("RGBa", image.size)
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = visible.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def outpaint_canvas(image: Image.Image, left: int, top: int, right: int, bottom: int):
    """(canvas, mask): the image on a larger canvas whose new border repeats the edge pixels outwards,
    and a mask that is white exactly on the new area."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    arr = np.asarray(image)
    canvas = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + arr.shape[0], left : left + arr.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, "L")


@dataclass
class InpaintJob:
    """Everything an inpainting run needs beyond an img2img run, per init image."""

    images: list[Image.Image]  # what is encoded as the init images (cropped, fitted, filled)
    condition_mask: Tensor  # (1, 1, H, W) mask at the output size (1 = repaint; rounded unless mask_round off)
    latent_mask: Tensor | None  # (1, 1, h, w) mask at latent size; None: no mask (plain img2img)
    overlays: list[Image.Image]  # RGBA originals, opaque where pixels are kept
    paste_to: tuple[int, int, int, int] | None  # "only masked": where the result goes (x, y, w, h)
    fill: int
    infotext: dict


def prepare(
    images: list[Image.Image],
    opts: InpaintOptions,
    width: int,
    height: int,
    resize_mode: int,
    down: int,
    protect: Image.Image | None = None,
) -> InpaintJob:
    """Mask and images for one request (see the module docstring); the output is ``width`` x ``height``.
    ``protect`` (outpainting): the blurred mask is kept at 0 wherever it is 0, so no original pixel is
    repainted."""
    if opts.mask is None:
        raise RequestError("inpainting needs a mask image (white = repaint): pass mask=... or --mask FILE")
    if len(images) != 1:
        raise RequestError(f"inpainting takes one init image, got {len(images)}")
    mask = binary_mask(open_image(opts.mask, what="mask"), opts.mask_round)
    if opts.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    bx, by = _blur_amounts(opts)
    mask = blur_mask(mask, bx, by)
    if protect is not None:
        mask = ImageChops.darker(mask, protect)
    info: dict = {"Mask blur": _blur_text(bx, by), "Outpaint": ",".join(map(str, opts.outpaint)) if protect else None}
    if opts.inpainting_mask_invert:
        info["Mask mode"] = "Inpaint not masked"
    rounding = {} if opts.mask_round else {"Mask rounding": False}  # (Forge's label)
    region = None
    if opts.inpaint_full_res:
        region = crop_region(mask, opts.inpaint_full_res_padding, width, height)
        if region is None:  # A1111: no mask, no overlay, no masked content: img2img of the whole picture
            logging.getLogger(__name__).info(EMPTY_MASK)
            return _whole_picture(images, width, height, resize_mode, {**info, **rounding})
    if opts.inpainting_fill != 1:
        info["Masked content"] = INPAINT_FILL[opts.inpainting_fill]
    if region is not None:
        overlay_mask = mask
        work_mask = prepare_image(mask.crop(region), width, height, 2)
        paste_to = (region[0], region[1], region[2] - region[0], region[3] - region[1])
        info["Inpaint area"] = "Only masked"
        info["Masked area padding"] = opts.inpaint_full_res_padding
    else:
        work_mask = prepare_image(mask, width, height, resize_mode)
        doubled = np.clip(np.asarray(work_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled, "L")
        paste_to = None
    prepared, overlays = [], []
    for img in images:
        img = flatten(img)
        if region is None:
            img = prepare_image(img, width, height, resize_mode)
        om = overlay_mask if overlay_mask.size == img.size else prepare_image(overlay_mask, *img.size, resize_mode)
        overlay = Image.new("RGBa", img.size)
        overlay.paste(img.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(om))
        overlays.append(overlay.convert("RGBA"))
        if region is not None:
            img = prepare_image(img.crop(region), width, height, 2)
        if opts.inpainting_fill != 1:
            img = fill_masked(img, work_mask)
        prepared.append(img)
    cond = torch.from_numpy(np.asarray(work_mask, dtype=np.float32) / 255.0)[None, None]
    # A1111: the latent mask is the work mask resized (PIL's default filter) to latent size, rounded
    small = work_mask.convert("RGB").resize((width // down, height // down))
    latent = torch.from_numpy(np.asarray(small, dtype=np.float32)[..., 0] / 255.0)[None, None]
    if opts.mask_round:  # A1111 1.8+'s mask_round (its default); off, the blend and the model keep grey levels
        latent, cond = latent.round(), cond.round()
    info = {k: v for k, v in {**info, **rounding}.items() if v is not None}
    return InpaintJob(prepared, cond, latent, overlays, paste_to, opts.inpainting_fill, info)


def _whole_picture(images: list[Image.Image], width: int, height: int, resize_mode: int, info: dict) -> InpaintJob:
    """The job of A1111's fallback to img2img ("only masked" with an empty mask): the flattened images
    fitted with the request's resize mode, no latent mask, no overlay; an inpainting model sees the whole
    picture masked (A1111's ``inpainting_image_conditioning`` without a mask)."""
    prepared = [prepare_image(flatten(img), width, height, resize_mode) for img in images]
    info = {k: v for k, v in info.items() if v is not None}
    return InpaintJob(prepared, torch.ones(1, 1, height, width), None, [], None, 1, info)


def _blur_amounts(opts: InpaintOptions) -> tuple[float, float]:
    bx = opts.mask_blur if opts.mask_blur_x is None else opts.mask_blur_x
    by = opts.mask_blur if opts.mask_blur_y is None else opts.mask_blur_y
    for name, v in (("mask_blur_x", bx), ("mask_blur_y", by)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 256:
            raise RequestError(f"{name} must be 0 to 256 pixels, got {v!r}")
    return bx, by


def _blur_text(bx: float, by: float):
    """A1111 writes its ``mask_blur`` property: the blur when x and y are the same, else None (left out)."""
    return f"{bx:g}" if bx == by and bx else None


def masked_denoiser(init: Tensor | Callable[[], Tensor], repaint: Tensor):
    """The wrapper that holds the unmasked latents to the original: every denoised estimate becomes
    ``init * (1 - repaint) + denoised * repaint`` (A1111's CFGDenoiser with a mask). ``init``: the latents
    held, or a function giving those of the batch being sampled."""
    held = init if callable(init) else lambda: init

    def wrap(denoise):
        def blended(x: Tensor, sigma) -> Tensor:
            return held() * (1 - repaint) + denoise(x, sigma) * repaint

        return blended

    return wrap


def overlay_result(image: Image.Image, job: InpaintJob, index: int) -> Image.Image:
    """Paste a generated image back (the "only masked" crop) and lay the kept original pixels over it."""
    overlay = job.overlays[index % len(job.overlays)]
    if job.paste_to is not None:
        x, y, w, h = job.paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(prepare_image(image, w, h, 1), (x, y))
        image = base
    out = image.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def outpaint_request(images: list[Image.Image], opts: InpaintOptions) -> tuple[list[Image.Image], Image.Image]:
    """The canvas and mask of an outpainting request. Right and bottom margins grow to make the canvas
    sides multiples of 8, so the output has exactly the canvas size and no original pixel is resampled."""
    if len(images) != 1:
        raise RequestError(f"outpainting takes one init image, got {len(images)}")
    image = ImageOps.exif_transpose(images[0])
    left, top, right, bottom = opts.outpaint
    right += -(image.width + left + right) % 8
    bottom += -(image.height + top + bottom) % 8
    canvas, mask = outpaint_canvas(image, left, top, right, bottom)
    return [canvas], mask


def model_concat(pipe, job: InpaintJob, weight: float) -> Tensor:
    """An inpainting model's extra channels for this job (the family's conditioner builds them)."""
    source = image_to_tensor(job.images[0]).to(pipe.device)
    return pipe.family.conditioner.masked_image_concat(pipe.vae, source, job.condition_mask.to(pipe.device), weight)


def unmasked_concat(pipe, images: Tensor, weight: float) -> Tensor | None:
    """An inpainting model's extra channels when no mask is given (plain img2img, the hires pass), as A1111's
    ``inpainting_image_conditioning`` without a mask: a mask of ones and the latent of ``lerp(image, 0,
    weight)`` for ``images`` (B, 3, H, W) in [-1, 1]. None at weight 1 (the image all cleared: the
    conditioner's default, the latent of a grey image) and for other models."""
    conditioner = pipe.family.conditioner
    if conditioner.kind != "inpaint" or weight == 1:
        return None
    ones = torch.ones(1, 1, *images.shape[-2:], device=pipe.device)
    return conditioner.masked_image_concat(pipe.vae, images.to(pipe.device), ones, weight)


def conditioning_infotext(pipe, req) -> dict:
    """A1111's "Conditional mask weight": written whenever the run uses an inpainting model's image
    conditioning (``p.is_using_inpainting_conditioning``: every txt2img and img2img run of an SD1/SD2
    inpainting model, with a mask or without), as the weight's ``str`` (a float: "1.0" by default)."""
    if pipe.family.conditioner.kind != "inpaint":
        return {}
    return {"Conditional mask weight": str(float(req.inpainting_mask_weight))}


def apply(plan: Plan, first: Pass, job: InpaintJob, init_latents: Tensor, pipe, opts: InpaintOptions) -> None:
    """Turn the img2img pass into an inpainting pass: the masked content of the starting latent, the
    masked denoiser, the final latent blend, and the overlay of the kept pixels. A job without a latent
    mask (A1111's fallback to img2img) only adds its infotext. The refiner's pass (refiner.add_pass)
    takes over the blend and the final blend."""
    plan.infotext.update(job.infotext)
    if job.latent_mask is None:
        return
    repaint = job.latent_mask.to(init_latents.device)
    held = [init_latents[:1]]  # A1111's init_latent of the batch being sampled (after the masked content)
    base = first.start
    step = 0 if plan.noise.subseed_strength else 1  # generate.pick_seeds: seed + i, or the seed itself

    def start(iteration: int, previous: Tensor | None, seeds: list[int]) -> Tensor:
        x = base(iteration, previous, seeds)
        if job.fill == 2:  # latent noise: plain noise of A1111's all_seeds[0:batch], the same for every batch
            first_seeds = [s - iteration * len(seeds) * step for s in seeds]
            options = NoiseOptions(source=plan.noise.source)
            filler = ImageNoise(first_seeds, first.shape, options=options, out_device=x.device).next()
            x = x * (1 - repaint) + filler * repaint
        elif job.fill == 3:  # latent nothing
            x = x * (1 - repaint)
        held[0] = x
        return x

    first.name = "inpaint"
    first.start = start
    first.wrappers.append(masked_denoiser(lambda: held[0], repaint))
    first.finish = lambda x: held[0] * (1 - repaint) + x * repaint
    plan.postprocess = lambda images, iteration: [overlay_result(im, job, i) for i, im in enumerate(images)]
