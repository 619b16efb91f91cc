"""Images in and out of generation: opening init images, fitting them to the output size (A1111's
resize modes), and conversion between PIL images and tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from latentforge.pipelines.request import RequestError


def open_image(image: Image.Image | str | Path, what: str = "init image") -> Image.Image:
    """A PIL image as given, or read from a path (``what`` names it in errors)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, TypeError) as e:
        raise RequestError(f"cannot read {what} {image}: {e}") from None


def prepare_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Fit an init image (or a mask, mode L) to the output size: 0 resize, 1 crop and resize, 2 resize
    and fill (A1111)."""
    image = ImageOps.exif_transpose(image)
    image = image if image.mode == "L" else image.convert("RGB")
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
    pad = ((top, height - arr.shape[0] - top), (left, width - arr.shape[1] - left), (0, 0))[: arr.ndim]
    arr = np.pad(arr, pad, mode="edge")
    return Image.fromarray(arr)


def image_to_tensor(image: Image.Image) -> Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """Decoded images in [-1, 1] -> 8-bit PIL images (rounded)."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
