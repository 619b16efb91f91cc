"""What each family's task adds to the text: the conditioning each side of CFG sees, and init images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from latentforge.conditioning import sdxl_vector
from latentforge.conditioning.schedule import prompt_schedule
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import Cond, CondSchedule

_SIZE_NUMBERS = {"sdxl": 6, "refiner": 5}


def _vector(pipe, pooled: Tensor, numbers: list[float]) -> Tensor:
    adm = pipe.unet.config.adm_in_channels
    dim = (adm - pooled.shape[-1]) // len(numbers)
    ids = torch.tensor([numbers], dtype=torch.float32, device=pooled.device).expand(pooled.shape[0], -1)
    return sdxl_vector(pooled.float(), ids, dim)


def conditioning(
    pipe, req: GenerationRequest, width: int, height: int, batch: int, total_steps: int | None = None
) -> tuple[CondSchedule, CondSchedule | None]:
    """Both sides of CFG for one pass of ``batch`` images (the prompt is the same for each), as
    schedules over ``total_steps`` model calls: A1111's prompt editing ``[a:b:when]`` and alternation
    ``[a|b]`` give several entries (conditioning/schedule.py), a plain prompt one."""
    fam = pipe.family
    if fam.task in ("depth", "upscale"):
        raise RequestError(
            f"{fam.name} models need their own input (a depth map or a low-resolution image); "
            "txt2img and img2img are not available for them"
        )
    total = total_steps or req.steps
    extra = inpaint_everything(pipe, width, height, batch) if fam.task == "inpaint" else None
    encoded: dict[str, object] = {}

    def encode(text: str):
        if text not in encoded:
            encoded[text] = pipe.encode_prompt(text, clip_skip=req.clip_skip, syntax=req.prompt_syntax)
        return encoded[text]

    def make(text: str, aesthetic: float, negative: bool) -> Cond:
        emb = encode(text)
        context, pooled = emb.context, emb.pooled
        if negative and fam.task == "sdxl" and not text.strip():
            # SDXL's original sampling zeroes the text conditioning of an empty negative prompt
            context = torch.zeros_like(context)
            pooled = torch.zeros_like(pooled)
        vector = None
        if fam.task == "sdxl":
            vector = _vector(pipe, pooled, [height, width, 0, 0, height, width])
        elif fam.task == "refiner":
            vector = _vector(pipe, pooled, [height, width, 0, 0, aesthetic])
        # no mask given: an inpainting model repaints everything, as A1111 does
        return Cond(context.expand(batch, -1, -1), None if vector is None else vector.expand(batch, -1), extra)

    def schedule(text: str, aesthetic: float, negative: bool) -> CondSchedule:
        entries = prompt_schedule(text, total) if req.prompt_syntax == "a1111" else [(total, text)]
        return CondSchedule([(end, make(t, aesthetic, negative)) for end, t in entries])

    cond = schedule(req.prompt, req.aesthetic_score, False)
    uncond = None if req.cfg_scale == 1.0 else schedule(req.negative_prompt, req.negative_aesthetic_score, True)
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
