"""What a ControlNet unit reads: its image (a PIL image, a path or base64; transparency over white, as the
extension's ``HWC3``), an inpaint unit's mask, the init image and A1111's mask for a unit without an image
in img2img (the extension's ``choose_input_image``), and the crop of a unit's input to the masked area in
"only masked" img2img (the extension's ``try_crop_image_with_a1111_mask``)."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from latentforge.pipelines.images import fit_image, open_image
from latentforge.pipelines.inpaint import crop_region
from latentforge.pipelines.request import ControlUnit, GenerationRequest, RequestError

# the extension's inpaint preprocessors: "inpaint" (labelled "inpaint_global_harmonious") and "inpaint_only",
# which also holds the unmasked area to the unit's image (control.py: restore)
INPAINT_MODULES = ("inpaint", "inpaint_global_harmonious", "inpaint_only")
MASK_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def _is_base64(value) -> bool:
    """A long string that names no file (a path too long for the system is no file either)."""
    if not isinstance(value, str) or len(value) <= 256:
        return False
    try:
        return not Path(value).exists()
    except (OSError, ValueError):
        return True


def _open_any(value, where: str) -> Image.Image:
    """A PIL image, a path, or base64 (optionally a ``data:`` URL), upright (EXIF orientation applied)."""
    if _is_base64(value):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{where}: the image is neither a file nor base64 ({e})") from None
        value = io.BytesIO(raw)
    return ImageOps.exif_transpose(open_image(value, where))  # the shared reader's checks


def over_white(image: Image.Image) -> Image.Image:
    """RGB, transparency composited over white (the extension's ``HWC3``)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_control_image(value, where: str) -> Image.Image:
    """A PIL image, a path, or base64 (optionally a ``data:`` URL) as the extension's API sends it: RGB,
    transparency over white."""
    return over_white(_open_any(value, where))


def read_inpaint_mask(value, size: tuple[int, int], where: str) -> np.ndarray:
    """An inpaint unit's mask -> (H, W) uint8, white = repaint: the first channel of the image, an image
    with transparency composited over white first (the extension's ``HWC3``); it must have ``size``."""
    image = _open_any(value, where)
    if image.mode not in MASK_MODES:
        raise RequestError(f"{where}: a mask must be a grey, RGB or RGBA 8-bit image, got mode {image.mode!r}")
    if image.size != size:
        raise RequestError(
            f"{where}: the mask is {image.size[0]}x{image.size[1]} but the unit's image is {size[0]}x{size[1]}; "
            "they must have the same size"
        )
    if image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        first = rgba[:, :, 0] * (rgba[:, :, 3] / 255.0) + 255.0 * (1.0 - rgba[:, :, 3] / 255.0)
        return first.clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))[:, :, 0].copy()


def split_inpaint_image(value, where: str) -> tuple[object, object]:
    """The extension's inpaint forms of ``image``: ``{"image": ..., "mask": ...}`` or ``(image, mask)``;
    anything else is the image alone (no mask)."""
    if isinstance(value, dict):
        unknown = set(value) - {"image", "mask"}
        if unknown or value.get("image") is None:
            keys = sorted(map(str, value))
            raise RequestError(f"{where}: an image dict must be {{'image': ..., 'mask': ...}}, got keys {keys}")
        return value["image"], value.get("mask")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise RequestError(f"{where}: an (image, mask) pair must have 2 items, got {len(value)}")
        return value[0], value[1]
    return value, None


def prepared_mask(req: GenerationRequest, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """A1111's img2img mask as the extension's ``prepare_mask`` makes it, before A1111 itself reads it:
    grey (``convert("L")``, no alpha threshold), inverted with ``inpainting_mask_invert``, blurred by
    ``mask_blur_x`` then ``mask_blur_y`` (cv2's Gaussian, kernel 2 * int(2.5 * blur + 0.5) + 1); (H, W)
    uint8 at its own size, which must be ``size`` (the init image's) when given."""
    import cv2

    mask = np.asarray(_open_any(req.inpaint.mask, f"{where}: the img2img mask").convert("L"))
    if size is not None and (mask.shape[1], mask.shape[0]) != size:
        raise RequestError(
            f"{where}: takes the init image and the img2img mask, which have other sizes "
            f"({size[0]}x{size[1]} and {mask.shape[1]}x{mask.shape[0]}); give the unit its own image"
        )
    o = req.inpaint
    if o.inpainting_mask_invert:
        mask = 255 - mask
    for blur, axis in ((o.mask_blur_x, 0), (o.mask_blur_y, 1)):  # None: mask_blur (InpaintOptions)
        blur = o.mask_blur if blur is None else blur
        if blur > 0:
            k = 2 * int(2.5 * blur + 0.5) + 1
            mask = cv2.GaussianBlur(mask, (k, 1) if axis == 0 else (1, k), blur)
    return np.ascontiguousarray(mask)


def img2img_input(init: Image.Image, req: GenerationRequest, unit: ControlUnit, where: str):
    """The extension's input for a unit without an image in img2img (``choose_input_image``): the first
    init image (upright, transparency over white, ``HWC3``), and for inpaint units A1111's mask as
    ``prepare_mask`` makes it (``prepared_mask``) or none -> (image, mask or None). The unit is then
    fitted with img2img's resize mode (``PreparedUnit.fit_mode``)."""
    image = over_white(ImageOps.exif_transpose(init))
    if unit.module not in INPAINT_MODULES or req.inpaint is None or req.inpaint.mask is None:
        return image, None
    return image, prepared_mask(req, image.size, where)


def masked_area(req: GenerationRequest, output: tuple[int, int], where: str) -> tuple[tuple, tuple[int, int]] | None:
    """Where "only masked" img2img (``inpaint_full_res``) works, as the extension computes it for the units'
    inputs: the region of ``prepared_mask`` at the mask's own size (its nonzero pixels' box grown by the
    padding, then to the ``output`` size's aspect ratio: A1111's ``get_crop_region`` and
    ``expand_crop_region``) and the mask's size; None when the request is no "only masked" inpainting or
    the mask is empty (A1111 then inpaints the whole picture)."""
    o = req.inpaint
    if o is None or o.mask is None or not o.inpaint_full_res:
        return None
    mask = Image.fromarray(prepared_mask(req, None, where), "L")
    region = crop_region(mask, o.inpaint_full_res_padding, *output)
    return None if region is None else (region, mask.size)


def crop_to_area(image: Image.Image, mask: np.ndarray | None, area: tuple, mode: int, width: int, height: int):
    """A unit's input (image, inpaint mask or None) cut to the masked area as the extension does: each
    channel fitted to the A1111 mask's size with the unit's resize ``mode``, cropped to the region, then
    fitted to ``width`` x ``height`` with Resize and Fill (A1111's ``resize_image``, Lanczos)."""
    region, size = area

    def cut(im: Image.Image) -> Image.Image:
        return fit_image(fit_image(im, *size, mode).crop(region), width, height, 2)

    image = cut(image)
    if mask is not None:
        mask = np.asarray(cut(Image.fromarray(mask, "L"))).copy()
    return image, mask
