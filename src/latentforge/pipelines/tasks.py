"""What each family's task adds to the text: the conditioning each side of CFG sees, and init images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from latentforge.conditioning import sdxl_vector
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import Cond

_SIZE_NUMBERS = {"sdxl": 6, "refiner": 5}


def _vector(pipe, pooled: Tensor, numbers: list[float]) -> Tensor:
    adm = pipe.unet.config.adm_in_channels
    dim = (adm - pooled.shape[-1]) // len(numbers)
    ids = torch.tensor([numbers], dtype=torch.float32, device=pooled.device).expand(pooled.shape[0], -1)
    return sdxl_vector(pooled.float(), ids, dim)


def conditioning(pipe, req: GenerationRequest, width: int, height: int, batch: int) -> tuple[Cond, Cond | None]:
    """Both sides of CFG for one pass of ``batch`` images (the prompt is the same for each)."""
    fam = pipe.family
    if fam.task in ("depth", "upscale"):
        raise RequestError(
            f"{fam.name} models need their own input (a depth map or a low-resolution image); "
            "txt2img and img2img are not available for them"
        )
    cond_emb = pipe.encode_prompt(req.prompt, clip_skip=req.clip_skip, syntax=req.prompt_syntax)
    zero_uncond = fam.task == "sdxl" and not req.negative_prompt.strip()
    uncond_emb = None
    if req.cfg_scale != 1.0:
        uncond_emb = pipe.encode_prompt(req.negative_prompt, clip_skip=req.clip_skip, syntax=req.prompt_syntax)
        if zero_uncond:  # SDXL's original sampling zeroes the text conditioning of an empty negative prompt
            uncond_emb.context = torch.zeros_like(uncond_emb.context)
            uncond_emb.pooled = torch.zeros_like(uncond_emb.pooled)

    def make(emb, aesthetic: float) -> Cond:
        vector = None
        if fam.task == "sdxl":
            vector = _vector(pipe, emb.pooled, [height, width, 0, 0, height, width])
        elif fam.task == "refiner":
            vector = _vector(pipe, emb.pooled, [height, width, 0, 0, aesthetic])
        context = emb.context.expand(batch, -1, -1)
        return Cond(context, None if vector is None else vector.expand(batch, -1))

    cond = make(cond_emb, req.aesthetic_score)
    uncond = None if uncond_emb is None else make(uncond_emb, req.negative_aesthetic_score)
    if fam.task == "inpaint":  # no mask given: repaint everything, as A1111 does for inpainting models
        extra = inpaint_everything(pipe, width, height, batch)
        cond.concat = extra
        if uncond is not None:
            uncond.concat = extra
    return cond, uncond


def inpaint_everything(pipe, width: int, height: int, batch: int) -> Tensor:
    """Inpainting-model input for "no mask": mask 1 everywhere and the latent of an empty (grey) image."""
    with torch.inference_mode():
        grey = torch.zeros(1, 3, height, width, device=pipe.device, dtype=pipe.vae.dtype)
        latent = pipe.vae.encode(grey).float()
    mask = torch.ones(1, 1, *latent.shape[-2:], device=latent.device)
    return torch.cat([mask, latent], dim=1).expand(batch, -1, -1, -1)


def prepare_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Fit an init image to the output size: 0 resize, 1 crop and resize, 2 resize and fill (A1111)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    scale = min(width / image.width, height / image.height)
    fitted = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    arr = np.asarray(fitted)
    top = (height - arr.shape[0]) // 2
    left = (width - arr.shape[1]) // 2
    arr = np.pad(arr, ((top, height - arr.shape[0] - top), (left, width - arr.shape[1] - left), (0, 0)), mode="edge")
    return Image.fromarray(arr)


def image_to_tensor(image: Image.Image) -> Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """Decoded images in [-1, 1] -> 8-bit PIL images (rounded)."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
