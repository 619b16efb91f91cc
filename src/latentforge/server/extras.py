"""A1111's ``/sdapi/v1/extra-single-image`` and ``extra-batch-images``: upscaling an image as the Extras
tab does (``modules/upscaler.py`` ``Upscaler.upscale``, ``scripts/postprocessing_upscale.py``).

The size: ``resize_mode`` 0 scales by ``upscaling_resize``; 1 scales by the larger of the two ratios to
``upscaling_resize_w`` x ``upscaling_resize_h`` and, with ``upscaling_crop``, centres the result on a
canvas of exactly that size. An upscaler aims at the scaled size rounded down to a multiple of 8: a
network runs (at most 3 passes) until the image is at least that large, a built-in one resizes by the
factor, and a final Lanczos resize gives the exact size. ``upscaler_2`` at
``extras_upscaler_2_visibility`` is blended over the first. Upscaler "None" as ``upscaler_1`` leaves the
image as it is. Face restoration is refused. Names are those ``/sdapi/v1/upscalers`` lists, never paths.
The work runs as a job on the server's queue (``JobSpec("extras")``), after ``check`` on the request's thread.
"""

from __future__ import annotations

import functools

from PIL import Image
from pydantic import BaseModel, Field

from latentforge.pipelines.checks import IMAGE_UPSCALERS
from latentforge.server.errors import FieldError

LANCZOS = Image.Resampling.LANCZOS
# the built-in upscalers (the hires fix's, pipelines/checks.py); "None" runs no step here (A1111's UpscalerNone)
BUILT_IN = {**IMAGE_UPSCALERS, "None": None}
MAX_PASSES = 3
MAX_TOTAL_OUTPUTS = 8  # one request's results together: at most this many times max_output_pixels


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


def _dest(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A1111's target: the scaled size rounded down to a multiple of 8."""
    return int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8)


def check(o: ExtrasOptions, images: list[Image.Image], config) -> None:
    """Everything that can be refused before the work, on the request's thread: face restoration, the
    options' ranges, upscaler names (built in, or listed by /sdapi/v1/upscalers), each result's size (at
    most ``max_output_pixels``) and all results together (at most ``MAX_TOTAL_OUTPUTS`` times that)."""
    from latentforge import upscalers

    if o.gfpgan_visibility or o.codeformer_visibility:
        field = "gfpgan_visibility" if o.gfpgan_visibility else "codeformer_visibility"
        raise FieldError(field, "face restoration is not available in latentforge; send 0")
    if not 0 <= o.extras_upscaler_2_visibility <= 1:
        raise FieldError("extras_upscaler_2_visibility", "must be between 0 and 1")
    names = [("upscaler_1", o.upscaler_1)]
    if o.upscaler_2 != "None" and o.extras_upscaler_2_visibility:
        names.append(("upscaler_2", o.upscaler_2))
    files = upscalers.available(config.upscaler_dirs)
    for field, name in names:
        if name not in BUILT_IN and name not in files:
            raise FieldError(field, f"unknown upscaler {name[:80]!r}; choose one of: {', '.join([*BUILT_IN, *files])}")
    total = 0
    for image in images:
        scale = scale_of(o, image.size)
        if o.upscaler_1 == "None":
            continue
        w, h = _dest(image.size, scale)
        if w < 8 or h < 8:
            raise FieldError(
                "upscaler_1", f"scaling {image.width}x{image.height} by {scale:g} leaves less than 8 pixels"
            )
        if w * h > config.max_output_pixels:
            raise FieldError(
                "upscaler_1", f"the result, {w}x{h}, is over the limit of {config.max_output_pixels} pixels"
            )
        total += w * h
    if total > MAX_TOTAL_OUTPUTS * config.max_output_pixels:
        raise FieldError("imageList", f"the results hold {total} pixels; one request may make at most "
                         f"{MAX_TOTAL_OUTPUTS * config.max_output_pixels} (send fewer images)")  # fmt: skip


@functools.lru_cache(maxsize=2)
def _network(path: str, mtime_ns: int, device: str):
    from latentforge import upscalers

    return upscalers.load(path, device=device)


def _upscale(image: Image.Image, name: str, scale: float, config) -> Image.Image:
    """A1111's ``Upscaler.upscale`` of ``image`` by ``scale`` with the upscaler ``name`` (checked by ``check``)."""
    from latentforge import upscalers

    dest = _dest(image.size, scale)
    if name in BUILT_IN:
        kind = BUILT_IN[name]

        def step(im: Image.Image) -> Image.Image:  # UpscalerNone, UpscalerLanczos, UpscalerNearest
            return im if kind is None else im.resize((int(im.width * scale), int(im.height * scale)), kind)
    else:
        path = upscalers.available(config.upscaler_dirs)[name]
        model = _network(str(path), path.stat().st_mtime_ns, config.device or "cpu")
        limit = config.max_output_pixels

        def step(im: Image.Image) -> Image.Image:
            out = (round(im.width * model.scale), round(im.height * model.scale))
            if out[0] * out[1] > limit:
                raise FieldError("upscaler_1", f"{name} would make {out[0]}x{out[1]}, over the limit of {limit} pixels")
            return upscalers.run(im, model)

    for i in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        before, image = image.size, step(image)
        if image.size == before:
            break
    return image if image.size == dest else image.resize(dest, LANCZOS)


def postprocess(image: Image.Image, o: ExtrasOptions, config) -> Image.Image:
    """One image through the Extras tab's upscale step (see the module's text), on the queue's worker."""
    image = image.convert("RGB")
    if o.upscaler_1 == "None":
        return image  # A1111's postprocessing_upscale: no first upscaler, nothing runs
    scale = scale_of(o, image.size)
    first = _upscale(image, o.upscaler_1, scale, config)
    if o.upscaler_2 != "None" and o.extras_upscaler_2_visibility > 0:
        second = _upscale(image, o.upscaler_2, scale, config)
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
