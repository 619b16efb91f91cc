"""A1111's ``/sdapi/v1/extra-single-image`` and ``extra-batch-images``: upscaling an image as the Extras
tab does (``modules/upscaler.py`` ``Upscaler.upscale``, ``scripts/postprocessing_upscale.py``).

The size: ``resize_mode`` 0 scales by ``upscaling_resize``; 1 scales by the larger of the two ratios to
``upscaling_resize_w`` x ``upscaling_resize_h`` and, with ``upscaling_crop``, centres the result on a
canvas of exactly that size. An upscaler aims at the scaled size rounded down to a multiple of 8: a
network runs (at most 3 passes) until the image is at least that large, a built-in one resizes by the
factor, and a final Lanczos resize gives the exact size. ``upscaler_2`` at
``extras_upscaler_2_visibility`` is blended over the first. Upscaler "None" as ``upscaler_1`` leaves the
image as it is. Face restoration is refused. Names are those ``/sdapi/v1/upscalers`` lists, never paths.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, Field

from latentforge.server.errors import FieldError

LANCZOS = Image.Resampling.LANCZOS
BUILT_IN = {"None": None, "Lanczos": LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_PASSES = 3
_ONE_AT_A_TIME = threading.Lock()  # a network's passes are large: one request's at a time


class ExtrasOptions(BaseModel):
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingle(ExtrasOptions):
    image: str


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatch(ExtrasOptions):
    imageList: list[FileData] = Field(default_factory=list, max_length=64)  # A1111's name


def scale_of(o: ExtrasOptions, size: tuple[int, int]) -> float:
    if o.resize_mode not in (0, 1):
        raise FieldError("resize_mode", f"must be 0 (scale by upscaling_resize) or 1 (to a size), got {o.resize_mode}")
    if o.resize_mode == 0:
        if not 0 < o.upscaling_resize <= 8:
            raise FieldError("upscaling_resize", f"must be above 0 and at most 8, got {o.upscaling_resize}")
        return o.upscaling_resize
    for name in ("upscaling_resize_w", "upscaling_resize_h"):
        if not 1 <= getattr(o, name) <= 16384:
            raise FieldError(name, f"must be 1 to 16384 pixels, got {getattr(o, name)}")
    return max(o.upscaling_resize_w / size[0], o.upscaling_resize_h / size[1])


def _upscale(image: Image.Image, name: str, scale: float, dirs, max_pixels: int, field: str) -> Image.Image:
    """A1111's ``Upscaler.upscale`` of ``image`` by ``scale`` with the upscaler ``name``."""
    from latentforge import upscalers

    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if dest[0] < 8 or dest[1] < 8:
        raise FieldError(field, f"scaling {image.width}x{image.height} by {scale:g} leaves less than 8 pixels")
    if dest[0] * dest[1] > max_pixels:
        raise FieldError(field, f"the result, {dest[0]}x{dest[1]}, is over the limit of {max_pixels} pixels")
    if name in BUILT_IN:
        kind = BUILT_IN[name]

        def step(im: Image.Image) -> Image.Image:  # UpscalerNone, UpscalerLanczos, UpscalerNearest
            return im if kind is None else im.resize((int(im.width * scale), int(im.height * scale)), kind)
    else:
        files = upscalers.available(dirs)
        if name not in files:
            known = ", ".join([*BUILT_IN, *files])
            raise FieldError(field, f"unknown upscaler {name[:80]!r}; choose one of: {known}")
        model = upscalers.load(files[name], device="cpu")

        def step(im: Image.Image) -> Image.Image:
            out = (round(im.width * model.scale), round(im.height * model.scale))
            if out[0] * out[1] > max_pixels:
                raise FieldError(field, f"{name} would make {out[0]}x{out[1]}, over the limit of {max_pixels} pixels")
            return upscalers.run(im, model)

    for i in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        before, image = image.size, step(image)
        if image.size == before:
            break
    return image if image.size == dest else image.resize(dest, LANCZOS)


def postprocess(image: Image.Image, o: ExtrasOptions, dirs: list[Path], max_pixels: int) -> Image.Image:
    """One image through the Extras tab's upscale step (see the module's text)."""
    if o.gfpgan_visibility or o.codeformer_visibility:
        field = "gfpgan_visibility" if o.gfpgan_visibility else "codeformer_visibility"
        raise FieldError(field, "face restoration is not available in latentforge; send 0")
    if not 0 <= o.extras_upscaler_2_visibility <= 1:
        raise FieldError("extras_upscaler_2_visibility", "must be between 0 and 1")
    image = image.convert("RGB")
    scale = scale_of(o, image.size)
    if o.upscaler_1 == "None":
        return image  # A1111's postprocessing_upscale: no first upscaler, nothing runs
    with _ONE_AT_A_TIME:
        first = _upscale(image, o.upscaler_1, scale, dirs, max_pixels, "upscaler_1")
        if o.upscaler_2 != "None" and o.extras_upscaler_2_visibility > 0:
            second = _upscale(image, o.upscaler_2, scale, dirs, max_pixels, "upscaler_2")
            first = Image.blend(first, second, o.extras_upscaler_2_visibility)
    if o.resize_mode == 1 and o.upscaling_crop:
        w, h = o.upscaling_resize_w, o.upscaling_resize_h
        canvas = Image.new("RGB", (w, h))
        canvas.paste(first, box=(w // 2 - first.width // 2, h // 2 - first.height // 2))
        first = canvas
    return first


def html_info(o: ExtrasOptions, scale: float) -> str:
    parts = [f"Postprocess upscale by: {scale:g}", f"Postprocess upscaler: {o.upscaler_1}"]
    if o.upscaler_2 != "None" and o.extras_upscaler_2_visibility:
        parts += [
            f"Postprocess upscaler 2: {o.upscaler_2}",
            f"Postprocess upscaler 2 visibility: {o.extras_upscaler_2_visibility:g}",
        ]
    return "<p>" + ", ".join(parts) + "</p>"
