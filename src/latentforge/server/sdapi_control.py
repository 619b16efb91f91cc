"""The A1111 ControlNet extension's units in an API payload (``alwayson_scripts.controlnet.args``) ->
latentforge's ``control`` units: models by the names ``/controlnet/model_list`` gives (never paths), images
decoded within the request's pixel budget (an inpaint unit's mask too, then carried with its image in the
extension's ``{"image": ..., "mask": ...}`` form), and the fields that would change the image but cannot run
refused (never dropped)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from latentforge.pipelines.checks import CONTROL_REFUSED_MODULES
from latentforge.pipelines.control_input import INPAINT_MODULES, MASK_MODES
from latentforge.server.errors import FieldError


def _refuse(field: str, message: str) -> None:
    raise FieldError(field, message)


CONTROL_FIELDS = ("pixel_perfect", "hr_option", "module", "weight", "guidance_start", "guidance_end", "control_mode",
                  "resize_mode", "threshold_a", "threshold_b", "processor_res", "inpaint_crop_input_image")  # fmt: skip


# the true/false texts pydantic (the extension's ControlNetUnit model) reads for a bool field
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _enabled(value, where: str) -> bool:
    """A unit's ``enabled``, read as the extension's pydantic model reads a bool ("no", 0: off)."""
    if isinstance(value, bool) or value is None:
        return value is not False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    _refuse(where, f"must be true or false, got {value!r}"[:200])
    return False


def control_units(
    p: dict,
    controlnets: dict[str, Path],
    max_pixels: int,
    budget: object,
    decode_image: Callable,
    img2img: bool = False,
) -> list[dict]:
    """The A1111 ControlNet extension's units (``alwayson_scripts.controlnet.args``) as ``control`` units.
    A unit's model must be one of the server's ControlNet files, named as /controlnet/model_list lists
    them (a trailing " [hash]" is ignored): nothing a client sends is used as a path. ``decode_image`` (sdapi's)
    reads each image within ``max_pixels`` and the request's pixel ``budget``."""
    scripts = {k.lower(): v for k, v in (p.get("alwayson_scripts") or {}).items()}
    script = scripts.get("controlnet")
    if script is None:
        return []
    args = script.get("args") if isinstance(script, dict) else script
    if not isinstance(args, list):
        _refuse("alwayson_scripts.controlnet.args", "must be a list of ControlNet units")
    units = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            _refuse(where, "must be an object (a ControlNet unit)")
        if not _enabled(unit.get("enabled", True), f"{where}.enabled"):
            continue
        name = re.sub(r" \[[0-9a-fA-F]{8,10}\]$", "", str(unit.get("model") or ""))
        if name not in controlnets:
            known = ", ".join(controlnets) or "none (the server has no usable ControlNet file; --controlnet-dir)"
            _refuse(f"{where}.model", f"unknown ControlNet model {unit.get('model')!r}; known: {known}")
        image = unit.get("image") or unit.get("input_image")
        if unit.get("mask") and unit.get("mask_image"):  # the extension: "Cannot specify both"
            _refuse(f"{where}.mask", "give the mask as 'mask' or as 'mask_image', not both")
        mask = unit.get("mask") or unit.get("mask_image")
        if isinstance(image, list) and len(image) == 2 and all(isinstance(x, str) for x in image):
            image = {"image": image[0], "mask": image[1]}  # the extension's [image, mask] pair
        if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
            if mask and image.get("mask"):
                _refuse(f"{where}.mask", "the image object carries a mask already; give it in one place")
            image, mask = image.get("image"), mask or image.get("mask")
        module = unit.get("module")
        if isinstance(module, str) and module in CONTROL_REFUSED_MODULES:
            why = CONTROL_REFUSED_MODULES[module]
            _refuse(f"{where}.module", f"{module!r} is not available in latentforge: it {why}")
        inpaint = module in INPAINT_MODULES
        if mask and not inpaint:
            _refuse(
                f"{where}.mask",
                f"a ControlNet unit's inpaint mask is not available for module {module or 'none'!r}; it needs an "
                f"inpaint module ({', '.join(INPAINT_MODULES)}). effective_region_mask says where a unit acts",
            )
        if not image and (mask or not img2img):  # img2img: the init image (and mask), as the extension
            _refuse(f"{where}.image", "a ControlNet unit needs an image (base64; in img2img the init image is taken)")
        for key in ("advanced_weighting", "ipadapter_input"):  # they change the image: never dropped
            if unit.get(key) is not None:
                _refuse(f"{where}.{key}", "is not available in latentforge; leave it null")
        fields = {k: unit[k] for k in CONTROL_FIELDS if unit.get(k) is not None}
        image = decode_image(image, f"{where}.image", max_pixels, budget) if image else None
        if mask:  # the unit carries the extension's {"image", "mask"} form (pipelines/control.py reads it)
            field = f"{where}.mask"
            mask = decode_image(mask, field, max_pixels, budget)
            if mask.size != image.size:
                _refuse(field, f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
            if mask.mode not in MASK_MODES:
                _refuse(field, f"a mask must be a grey, RGB or RGBA 8-bit image, got mode {mask.mode!r}")
            image = {"image": image, "mask": mask}
        region = unit.get("effective_region_mask")
        if region:  # where the unit acts (the extension's 1.1.44x field)
            fields["effective_region_mask"] = decode_image(region, f"{where}.effective_region_mask", max_pixels, budget)
        units.append({"model": str(controlnets[name]), "image": image, **fields})
    return units
