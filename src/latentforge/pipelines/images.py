"""Images in and out of generation: opening init images, fitting them to the output size (A1111's
resize modes), and conversion between PIL images and tensors in [-1, 1]."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from latentforge.pipelines.checks import MAX_INPUT_PIXELS, RequestError


def check_pixels(size: tuple[int, int], what: str) -> None:
    """Refuse an input image of more than ``MAX_INPUT_PIXELS`` pixels (from its header, before decoding:
    a small compressed file can hold a huge image)."""
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise RequestError(
            f"{what} is {w}x{h} pixels; images of more than {MAX_INPUT_PIXELS} pixels "
            f"({int(MAX_INPUT_PIXELS**0.5)}x{int(MAX_INPUT_PIXELS**0.5)}) are refused: resize it first"
        )
    if w < 1 or h < 1:
        raise RequestError(f"{what} is {w}x{h} pixels: it holds no pixels")


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey image (PNG/TIFF: mode I;16 or I) as 8-bit grey (L), by its high byte. PIL's own
    conversion to RGB or L clips at 255, which turns all but the darkest 16-bit images white."""
    if image.mode not in _HIGH_DEPTH:
        return image
    arr = np.asarray(image, dtype=np.float64) / 257.0
    out = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    out.info = dict(image.info)  # the parameters a PNG carries
    return out


def open_image(image: Image.Image | str | Path, what: str = "init image", *, keep_depth: bool = False) -> Image.Image:
    """A PIL image as given, or read from a path (``what`` names it in errors). Its size is checked
    before its pixels are decoded; an unreadable, truncated or oversized file is a RequestError.
    16-bit grey images become 8-bit (``to_8bit``) unless ``keep_depth`` (depth maps keep their range)."""
    if not isinstance(image, (Image.Image, str, bytes, os.PathLike)) and not hasattr(image, "read"):
        raise RequestError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    name = what if isinstance(image, Image.Image) else f"{what} {image}"
    if isinstance(image, Image.Image):
        check_pixels(image.size, name)
        return image if keep_depth else to_8bit(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our limit
            im = Image.open(image)
        with im:
            check_pixels(im.size, name)
            im.load()
            return im.copy() if keep_depth else to_8bit(im.copy())
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(
            f"{name} is refused as a decompression bomb ({e}); images of more than {MAX_INPUT_PIXELS} pixels "
            "are refused: resize it first"
        ) from None
    except Exception as e:  # any failure of a decoder on a hostile file means "cannot read"
        raise RequestError(f"cannot read {name}: {type(e).__name__}: {e}") from None


def prepare_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Fit an init image (or a mask, mode L) to the output size: 0 resize, 1 crop and resize, 2 resize
    and fill (A1111)."""
    try:
        image = ImageOps.exif_transpose(image)
        image = image if image.mode == "L" else image.convert("RGB")
    except Exception as e:  # broken EXIF or a mode PIL cannot convert: refused, never a traceback
        raise RequestError(f"cannot use an input image of mode {image.mode}: {type(e).__name__}: {e}") from None
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
