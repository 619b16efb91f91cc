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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
MAX_16BIT = 65535


def to_8bit(image: Image.Image, what: str = "image") -> Image.Image:
    """A grey image of more than 8 bits as 8-bit grey (L), by a fixed rule; other modes are returned as
    they are. PIL's own conversion to RGB or L clips at 255: it turns all but the darkest 16-bit images
    white, and float images black.

    - 16-bit (I;16, I;16L, I;16B, I;16N): level v becomes round(v / 257), 65535 -> 255.
    - 32-bit integer (I): the same rule when every value is 0 to 65535 (16-bit data: older Pillows open
      16-bit PNGs as I); other values have no agreed scale, and the image is a RequestError.
    - 32-bit float (F, float TIFFs): round(v * 255) of v clipped to [0, 1] (so -inf is 0 and inf 255).
      NaN has no grey level: an image holding NaN is a RequestError.
    """
    if image.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return image
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        bad = int(np.isnan(arr).sum())
        if bad:
            raise RequestError(
                f"{what} is a floating-point image with {bad} NaN pixels, which have no grey level; "
                "replace them (0 to 1 is black to white) and try again"
            )
        levels = np.round(np.clip(arr, 0.0, 1.0) * np.float32(255)).astype(np.uint8)
    else:
        arr = np.asarray(image)
        if image.mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_16BIT):
            raise RequestError(
                f"{what} is a 32-bit integer image with values from {int(arr.min())} to {int(arr.max())}; only "
                f"0 to {MAX_16BIT} (16-bit levels) have an agreed grey scale: convert it to 8 or 16 bits first"
            )
        levels = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257): never a tie
    out = Image.fromarray(levels, mode="L")
    out.info = dict(image.info)  # the parameters a PNG carries
    return out


def open_image(image: Image.Image | str | Path, what: str = "init image", *, keep_depth: bool = False) -> Image.Image:
    """A PIL image as given, or read from a path (``what`` names it in errors). Its size is checked
    before its pixels are decoded; an unreadable, truncated or oversized file is a RequestError.
    16-bit, 32-bit integer and float grey images become 8-bit (``to_8bit`` says how) unless
    ``keep_depth`` (depth maps keep their range)."""
    if not isinstance(image, (Image.Image, str, bytes, os.PathLike)) and not hasattr(image, "read"):
        raise RequestError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    name = what if isinstance(image, Image.Image) else f"{what} {image}"
    if isinstance(image, Image.Image):
        check_pixels(image.size, name)
        return image if keep_depth else to_8bit(image, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our limit
            im = Image.open(image)
        with im:
            check_pixels(im.size, name)
            im.load()
            return im.copy() if keep_depth else to_8bit(im.copy(), name)
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(
            f"{name} is refused as a decompression bomb ({e}); images of more than {MAX_INPUT_PIXELS} pixels "
            "are refused: resize it first"
        ) from None
    except Exception as e:  # any failure of a decoder on a hostile file means "cannot read"
        raise RequestError(f"cannot read {name}: {type(e).__name__}: {e}") from None


BACKGROUND = "#ffffff"  # what shows through an init image's transparent pixels (A1111's default setting)


def prepare_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Fit an init image (or a mask, mode L) to the output size: 0 resize, 1 crop and resize, 2 resize
    and fill (A1111). Transparent pixels of an RGBA image show white, as A1111 flattens them."""
    return fit_image(flatten_image(image), width, height, mode)


def flatten_image(image: Image.Image) -> Image.Image:
    """An init image (or a mask, mode L) as it is encoded, at its own size: turned by its EXIF orientation,
    transparent pixels white (A1111's ``images.flatten``), RGB (a mask stays L)."""
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode == "RGBA":  # A1111's images.flatten: onto img2img_background_color, white by default
            base = Image.new("RGBA", image.size, BACKGROUND)
            base.paste(image, mask=image)
            image = base
        image = image if image.mode == "L" else image.convert("RGB")
    except Exception as e:  # broken EXIF or a mode PIL cannot convert: refused, never a traceback
        raise RequestError(f"cannot use an input image of mode {image.mode}: {type(e).__name__}: {e}") from None
    return image


COVER_PIXELS = 4_000_000  # Crop and Resize scales a cover this large only when it shows most of it


def fit_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's ``images.resize_image`` without an upscaler: Lanczos to ``width`` x ``height`` (0); or
    scaled so the image covers (1, Crop and Resize) or fits inside (2, Resize and Fill) the output, the
    scaled side computed with floor division and centred at ``size // 2 - scaled // 2``; Resize and Fill
    then fills each side band by stretching the edge with PIL's default filter over an empty source box
    (a bicubic extrapolation of the last two rows or columns, not a plain copy)."""
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    wide = ratio > src_ratio if cover else ratio < src_ratio  # width is the side that fits exactly
    tall = ratio <= src_ratio if cover else ratio >= src_ratio
    sw = width if wide else image.width * height // image.height
    sh = height if tall else image.height * width // image.width
    if cover and sw * sh > max(16 * width * height, COVER_PIXELS):  # a thin image: only the part that shows
        dx, dy = sw // 2 - width // 2, sh // 2 - height // 2  # (near the full path; no huge cover made)
        kx, ky = image.width / sw, image.height / sh
        box = (dx * kx, dy * ky, (dx + width) * kx, (dy + height) * ky)
        return image.resize((width, height), Image.Resampling.LANCZOS, box=box)
    scaled = image.resize((max(sw, 1), max(sh, 1)), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(scaled, (width // 2 - sw // 2, height // 2 - sh // 2))
    if cover:
        return out
    if ratio < src_ratio:  # bands above and below
        band = height // 2 - sh // 2
        if band > 0:
            out.paste(scaled.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(scaled.resize((width, band), box=(0, sh, width, sh)), (0, band + sh))
    elif ratio > src_ratio:  # bands left and right
        band = width // 2 - sw // 2
        if band > 0:
            out.paste(scaled.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(scaled.resize((band, height), box=(sw, 0, sw, height)), (band + sw, 0))
    return out


def image_to_tensor(image: Image.Image) -> Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_images(x: Tensor, finish=None) -> list[Image.Image]:
    """Decoded images in [-1, 1] -> 8-bit PIL images as A1111, Forge and ComfyUI make them: ``(x + 1) / 2``
    clipped to [0, 1], times 255 in float32, truncated (``astype(np.uint8)``); diffusers rounds instead.
    ``finish``: applied to the [0, 1] images first (A1111's ``postprocess_batch`` scripts see them there)."""
    unit = ((x.float() + 1) / 2).clamp(0, 1)
    if finish is not None:
        unit = finish(unit)
    arr = (255.0 * unit).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
