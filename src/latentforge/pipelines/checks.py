"""Checks shared by requests and the files they come from: the error type, limits, and field types.

Requests arrive from JSON, PNG metadata and command lines, so every field is checked for its type
(a bool is not a number, a string is not a number) and range before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from PIL import Image

from latentforge.conditioning.prompt import PromptError, check_prompt, parse_attention, split_and
from latentforge.conditioning.schedule import MAX_SCHEDULE_TEXTS, prompt_schedule


class RequestError(ValueError):
    """A request that cannot run; the message says which field and what is allowed."""


MAX_STEPS = 1000
MAX_NETWORKS = 64  # LoRAs, hypernetworks and embeddings one request applies (each one is work per weight)
MAX_SIDE = 8192  # pixels, width and height (explicit, from an init image, or after hires)
MAX_INPUT_PIXELS = 8192 * 8192  # pixels of an image file read as input (checked before decoding)
# numeric fields that are finite numbers within a range (s_tmax may be infinite: "no upper bound")
RANGES = {
    "denoising_strength": (0.0, 1.0),
    "initial_noise_multiplier": (0.0, 10.0),
    "inpainting_mask_weight": (0.0, 1.0),
    "eta": (0.0, 10.0),
    "s_churn": (0.0, 100.0),
    "s_tmin": (0.0, 1e4),
    "s_tmax": (0.0, math.inf),
    "s_noise": (0.0, 100.0),
    "aesthetic_score": (0.0, 10.0),
    "negative_aesthetic_score": (0.0, 10.0),
}


def is_int(value: object) -> bool:
    """A whole number (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float (not a bool); finiteness is checked by the caller."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def python_scalar(value):
    """A numpy scalar (``np.int64(64)``: a slider's, an array's) as the Python number it holds; else as is."""
    return value.item() if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 else value


def show(value: object) -> str:
    """A value for an error message, cut short (it may come from a file)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KINDS = {
    "int": ("a whole number", is_int),
    "float": ("a number", is_number),
    "str": ("text", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
}


def optional(cls: type, name: str) -> bool:
    """Whether field ``name`` of dataclass ``cls`` may be None."""
    return any(f.name == name and (f.type.endswith("| None") or f.type == "Any") for f in fields(cls))


def check_types(cls: type, values: dict, where: str = "") -> None:
    """RequestError unless each value in ``values`` has its field's type in ``cls`` (int, float, str,
    bool, dict, optionally None; a bool is not a number here). Other fields (groups, Any) are left to
    their own checks."""
    for f in fields(cls):
        if f.name not in values:
            continue
        may_be_none = f.type.endswith("| None")
        kind = _KINDS.get(f.type.removesuffix(" | None"))
        value = values[f.name]
        if kind is None or (may_be_none and value is None):
            continue
        what, ok = kind
        if not ok(value):
            what += " or none" if may_be_none else ""
            raise RequestError(f"{where}{f.name} must be {what}, got {type(value).__name__} {show(value)}")


# Hires upscalers, A1111's names -> (interpolation mode, antialias) for latent ones, a PIL filter for
# image ones (pipelines/hires.py uses them)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {
    "None": Image.Resampling.LANCZOS,  # A1111's UpscalerNone keeps the image; resize_image then uses Lanczos
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}


def builtin_upscaler(name: str) -> str | None:
    """The canonical name of a built-in upscaler given in any letter case, or None."""
    for known in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS):
        if isinstance(name, str) and name.strip().lower() == known.lower():
            return known
    return None


def hires_upscaler(h) -> str:
    """The upscaler a hires group (``HiresOptions``) runs: its own, else A1111's default "Latent"."""
    return "Latent" if h.upscaler is None else h.upscaler


def upscaler_name(name: str, *, model_files: bool = False) -> str:
    """The canonical name of an upscaler, or a RequestError listing them. With ``model_files`` (an
    upscaler folder is configured), another name is kept as the name of an upscaler model file, found
    when the plan is built (``upscalers.find``); a path to a .pth/.safetensors file is always kept."""
    known = builtin_upscaler(name)
    if known is not None:
        return known
    is_file = isinstance(name, str) and Path(name).suffix.lower() in (".pth", ".safetensors") and Path(name).is_file()
    if isinstance(name, str) and name.strip() and (model_files or is_file):
        return name.strip()
    raise RequestError(
        f"unknown hires upscaler {name!r}; choose one of: {', '.join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])}, "
        "or an ESRGAN-family model file by path, or by name when an upscaler folder is configured (--upscaler-dir)"
    )


# A1111's "same as the first pass" choices of the hires pass's sampler and schedule
SAME_SAMPLER = ("", "Use same sampler")
SAME_SCHEDULE = ("", "Use same scheduler")


def hires_request(req):
    """The request as the hires pass sees it (A1111 1.6+): its own prompt, negative prompt, sampler and
    schedule where ``req.hires`` gives them (hr_prompt, hr_negative_prompt, hr_sampler_name, hr_scheduler),
    the first pass's otherwise."""
    h = req.hires
    return replace(
        req,
        prompt=h.prompt or req.prompt,
        negative_prompt=h.negative_prompt or req.negative_prompt,
        sampler=req.sampler if h.sampler in SAME_SAMPLER else h.sampler,
        schedule=_first_pass_schedule(req) if h.schedule in SAME_SCHEDULE else h.schedule,
    )


def _first_pass_schedule(req) -> str:
    """The first pass's schedule as A1111's API keeps it for the hires pass: the request's, or the one its
    sampler name holds ("DPM++ 2M SDE Karras": Karras) unless that is the sampler's own default (A1111's
    ``get_sampler_and_scheduler`` turns it back into Automatic)."""
    from latentforge.sampling.registry import resolve_sampler
    from latentforge.sampling.schedules import schedule_name

    try:
        if schedule_name(req.schedule) != "automatic":
            return req.schedule
        info, named = resolve_sampler(req.sampler)
    except (ValueError, AttributeError):
        return req.schedule  # (refused by the request's own checks)
    return named if named and named != info.schedule else req.schedule


def validate_hires(h, need: Callable[[bool, str], None], upscaler_files: bool = False) -> None:
    """The hires group's fields (``HiresOptions``), with A1111's flat names in the messages."""
    need(
        isinstance(h.scale, (int, float)) and math.isfinite(h.scale) and 0 < h.scale <= 8,
        f"hr_scale must be above 0 and at most 8, got {h.scale!r}",
    )
    steps = h.second_pass_steps
    need(
        isinstance(steps, int) and 0 <= steps <= 1000,
        f"hr_second_pass_steps must be 0 (same as steps) to 1000, got {steps!r}",
    )
    for name in ("resize_x", "resize_y"):
        value = getattr(h, name)
        need(
            isinstance(value, int) and (value == 0 or 64 <= value <= 8192),
            f"hr_{name} must be 0 (unused) or 64 to 8192 pixels, got {value!r}",
        )
    for name in ("prompt", "negative_prompt"):
        try:
            check_prompt(getattr(h, name), f"hr_{name}")
        except PromptError as e:
            need(False, str(e))
    upscaler_name(hires_upscaler(h), model_files=upscaler_files)
    need(
        isinstance(h.checkpoint, str) or (hasattr(h.checkpoint, "unet") and hasattr(h.checkpoint, "family")),
        "hr_checkpoint_name must name a checkpoint file or folder (or be a loaded Pipeline; empty: the same model)",
    )


SAME_CHECKPOINT = ("", "Use same checkpoint")  # A1111's hr_checkpoint_name for "this model"


def hires_checkpoint(h) -> object | None:
    """The hires pass's other model (a path or a loaded Pipeline), or None for the first pass's."""
    c = getattr(h, "checkpoint", "")
    return None if isinstance(c, str) and c.strip() in SAME_CHECKPOINT else c


# A1111's "Masked content" names of inpainting_fill
INPAINT_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def validate_inpaint(o, need: Callable[[bool, str], None], img2img: bool) -> None:
    """The inpaint group's fields (``InpaintOptions``)."""
    need(img2img, "inpainting and outpainting need an init image (img2img)")
    need(
        o.inpainting_fill in INPAINT_FILL,
        "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)",
    )
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
        v = getattr(o, name)
        ok = (v is None and name != "mask_blur") or (is_number(v) and 0 <= v <= 256)
        need(ok, f"{name} must be between 0 and 256 pixels, got {show(v)}")
    pad = o.inpaint_full_res_padding
    need(isinstance(pad, int) and 0 <= pad <= 1024, f"inpaint_full_res_padding must be 0 to 1024 pixels, got {pad!r}")
    for name in ("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom"):
        v = getattr(o, name)
        need(
            isinstance(v, int) and 0 <= v <= 4096 and v % 8 == 0,
            f"{name} must be a multiple of 8 from 0 to 4096 pixels, got {v!r}",
        )
    need(o.mask is not None or any(o.outpaint), "inpainting needs a mask image (white = repaint), or outpaint margins")


# the A1111 ControlNet extension's names of its control and resize modes (the API takes index or name)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
MAX_CONTROL_UNITS = 10  # units in one request (the extension's largest unit count setting)
CONTROL_HR_OPTIONS = ("Both", "Low res only", "High res only")  # the passes of a hires fix a unit controls
# the A1111 ControlNet extension's module names; "hed" and "hed_safe" are its old names of the HED ones
CONTROL_MODULES = ("none", "canny", "depth", "softedge_hed", "softedge_hedsafe", "hed", "hed_safe", "inpaint",
                   "inpaint_global_harmonious", "inpaint_only")  # fmt: skip
# the extension's modules that latentforge refuses by name, with why
CONTROL_REFUSED_MODULES = {
    "inpaint_only+lama": "needs the LaMa inpainting model (big-lama), which latentforge does not have; use "
    "inpaint_global_harmonious",
}


def mode_index(value: int | str, names: tuple[str, ...], field_name: str) -> int:
    """A mode given as its index or its name (case-insensitive) -> its index."""
    if isinstance(value, bool):
        raise RequestError(f"{field_name} must be 0 to {len(names) - 1} or one of {', '.join(names)}, got {value!r}")
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        lower = [n.lower() for n in names]
        if value.lower() in lower:
            return lower.index(value.lower())
    raise RequestError(f"{field_name} must be 0 to {len(names) - 1} or one of {', '.join(names)}, got {value!r}")


MAX_NETWORK_WEIGHT = 100.0  # |LoRA/hypernetwork strength|; beyond it the weights overflow to NaN/Inf


def validate_network(where: str, ref, need: Callable[[bool, str], None]) -> None:
    """A network ref's strengths: finite numbers within +-``MAX_NETWORK_WEIGHT`` (a NaN or huge strength
    would only show up as NaN latents after the model ran, blamed on the checkpoint)."""
    for name in ("strength", "text_strength"):
        value = getattr(ref, name)
        if value is None and name == "text_strength":
            continue
        need(
            is_number(value) and math.isfinite(value) and abs(value) <= MAX_NETWORK_WEIGHT,
            f"{where}: {name} must be a finite number from -{MAX_NETWORK_WEIGHT:g} to {MAX_NETWORK_WEIGHT:g}, "
            f"got {show(value)}",
        )
    dyn = getattr(ref, "dyn", None)
    need(dyn is None or (isinstance(dyn, int) and not isinstance(dyn, bool)), f"{where}: dyn must be a whole number")


def validate_control(i: int, u, need: Callable[[bool, str], None], img2img: bool = False) -> None:
    """A ControlNet unit's fields (the A1111 ControlNet extension's API ranges); in img2img a unit without
    an image takes the init image (``control.prepare``)."""
    where = f"control unit {i}"
    need(isinstance(u.model, str) and bool(u.model), f"{where}: 'model' must name a ControlNet file")
    need(u.image is not None or img2img, f"{where}: no control image was given ('image')")
    refused = CONTROL_REFUSED_MODULES.get(u.module) if isinstance(u.module, str) else None
    need(refused is None, f"{where}: module {u.module!r} is not available in latentforge: it {refused}")
    need(u.module in CONTROL_MODULES, f"{where}: module must be one of {', '.join(CONTROL_MODULES)}, got {u.module!r}")
    w = u.weight
    need(isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w <= 2, f"{where}: weight must be 0 to 2, got {w!r}")
    a, b = u.guidance_start, u.guidance_end
    need(
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and 0 <= a <= b <= 1,
        f"{where}: guidance_start and guidance_end must satisfy 0 <= start <= end <= 1, got {a!r}, {b!r}",
    )
    mode_index(u.control_mode, CONTROL_MODES, f"{where}: control_mode")
    mode_index(u.resize_mode, CONTROL_RESIZE_MODES, f"{where}: resize_mode")
    mode_index(u.hr_option, CONTROL_HR_OPTIONS, f"{where}: hr_option")
    need(isinstance(u.pixel_perfect, bool), f"{where}: pixel_perfect must be true or false, got {u.pixel_perfect!r}")
    crop = u.inpaint_crop_input_image
    need(isinstance(crop, bool), f"{where}: inpaint_crop_input_image must be true or false, got {crop!r}")
    r = u.processor_res
    need(
        isinstance(r, int) and (r == -1 or 64 <= r <= 4096),
        f"{where}: processor_res must be -1 or 64 to 4096, got {r!r}",
    )
    for name in ("threshold_a", "threshold_b"):
        v = getattr(u, name)
        need(
            isinstance(v, (int, float)) and -1 <= v <= 1000, f"{where}: {name} must be -1 (default) to 1000, got {v!r}"
        )


def given(value) -> bool:
    """A value set: not None and not the empty string."""
    return value is not None and not (isinstance(value, str) and not value)


def validate_refiner(r, need: Callable[[bool, str], None]) -> None:
    """The refiner group's fields (``RefinerOptions``)."""
    need(
        isinstance(r.switch_at, (int, float)) and math.isfinite(r.switch_at) and 0.0 <= r.switch_at <= 1.0,
        f"refiner_switch_at must be between 0 and 1, got {r.switch_at!r}",
    )
    need(
        given(r.checkpoint),
        "refiner_checkpoint must name the refiner's checkpoint file or folder (or be a loaded Pipeline)",
    )
    need(
        isinstance(r.switch_by_steps, bool), f"refiner_switch_by_steps must be true or false, got {r.switch_by_steps!r}"
    )


def validate_x4(x, need: Callable[[bool, str], None]) -> None:
    """The x4 upscaler group's fields (``X4Options``)."""
    need(
        isinstance(x.noise_level, int) and 0 <= x.noise_level <= 350,
        f"x4 noise_level must be a whole number from 0 to 350, got {x.noise_level!r}",
    )
    need(
        x.tile is None or (isinstance(x.tile, int) and (x.tile == 0 or (x.tile >= 32 and x.tile % 8 == 0))),
        f"x4 tile must be None (automatic), 0 (never) or a multiple of 8 of at least 32 pixels, got {x.tile!r}",
    )
    need(
        isinstance(x.tile_overlap, int) and x.tile_overlap >= 0 and x.tile_overlap % 8 == 0,
        f"x4 tile_overlap must be a non-negative multiple of 8, got {x.tile_overlap!r}",
    )


def check_schedules(req, calls: int, first_pass_calls: int | None = None, parsed: set | None = None) -> None:
    """The prompt parsers' limits over one pass of ``calls`` model calls (a hires pass: after a first pass
    of ``first_pass_calls``, on A1111's one timeline): each AND part of the prompt has a schedule and every
    different text is encoded (pipelines/plan.py), so at most ``MAX_SCHEDULE_TEXTS`` of them, each with
    emphasis in bounds (each text parsed once: ``parsed`` holds those already checked). A ``RequestError``
    names the prompt (and the hires pass)."""
    parsed = set() if parsed is None else parsed
    where = "" if first_pass_calls is None else " (hires pass)"
    for name in ("prompt", "negative_prompt"):
        try:
            parts = split_and(req.prompt) if name == "prompt" else [(req.negative_prompt, 1.0)]
            texts = {
                (i, t) for i, (part, _) in enumerate(parts) for _, t in prompt_schedule(part, calls, first_pass_calls)
            }
            if len(texts) > MAX_SCHEDULE_TEXTS:
                raise PromptError(
                    f"its AND parts, prompt editing and alternation give {len(texts)} different prompts "
                    f"over the steps; the limit is {MAX_SCHEDULE_TEXTS} (each is encoded)"
                )
            for _, text in texts:
                if text not in parsed:
                    parse_attention(text)
                    parsed.add(text)
        except PromptError as e:
            raise RequestError(f"{name}{where}: {e}") from None
