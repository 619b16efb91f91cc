"""What to generate: the core request and its typed option groups, shared by the Python API and the CLI.

A request is the core fields every generation has, plus optional groups: ``hires`` (A1111's Hires.
fix), ``inpaint`` (a mask, or outpainting margins), ``depth`` (depth-to-image), ``refiner`` (the SDXL
refiner hand-off), ``x4`` (the x4 upscaler task), and places for ``networks`` (LoRA, hypernetworks,
embeddings by name) and ``control`` (ControlNet units, pipelines/control.py). A group that is None
(or an empty list) is off. A1111's flat field names (``enable_hr``,
``hr_scale``, ``refiner_checkpoint``, ``mask_blur``, ...) are accepted by ``from_dict`` and as keyword
options, and folded into the groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

from PIL import Image

from latentforge.sampling.noise import RNG_SOURCES
from latentforge.sampling.registry import resolve
from latentforge.sampling.schedules import schedule_name


class RequestError(ValueError):
    """A request that cannot run; the message says which field and what is allowed."""


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
IMAGE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def builtin_upscaler(name: str) -> str | None:
    """The canonical name of a built-in upscaler given in any letter case, or None."""
    for known in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS):
        if isinstance(name, str) and name.strip().lower() == known.lower():
            return known
    return None


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


@dataclass
class HiresOptions:
    """A1111's "Hires. fix" (txt2img): upscale the first pass, then an img2img pass at the larger size
    with the request's ``denoising_strength`` (pipelines/hires.py)."""

    scale: float = 2.0
    upscaler: str = "Latent"  # see LATENT_UPSCALERS and IMAGE_UPSCALERS, or an ESRGAN-family model (upscalers.py)
    second_pass_steps: int = 0  # 0: the same as steps
    resize_x: int = 0  # a target width instead of scale (0: unused)
    resize_y: int = 0


# A1111's "Masked content" names of inpainting_fill
INPAINT_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


@dataclass
class InpaintOptions:
    """Inpainting with a mask, and outpainting (A1111's img2img inpaint fields; pipelines/inpaint.py)."""

    mask: Any = None  # a PIL image or a path: white = repaint (an RGBA image's transparency counts)
    mask_blur: float = 4  # Gaussian blur of the mask in pixels; mask_blur_x/y set the axes apart
    mask_blur_x: float | None = None
    mask_blur_y: float | None = None
    inpainting_fill: int = 1  # masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # "only masked": work on the mask's region at full resolution
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False  # repaint what is NOT masked
    inpainting_mask_weight: float = 1.0  # inpainting models: how much of the masked image they see cleared
    outpaint_left: int = 0  # outpainting: extend the canvas by these many pixels (multiples of 8)
    outpaint_top: int = 0
    outpaint_right: int = 0
    outpaint_bottom: int = 0

    @property
    def outpaint(self) -> tuple[int, int, int, int]:
        return (self.outpaint_left, self.outpaint_top, self.outpaint_right, self.outpaint_bottom)


@dataclass
class DepthOptions:
    """Depth-to-image (depth models): a depth map given as an image (larger = nearer, any scale: it is
    normalised), or the MiDaS file that estimates it from the init image (pipelines/depth.py)."""

    map: Any = None  # a PIL image, an array/tensor (H, W) or a path
    model: str = ""  # path of dpt_hybrid-midas-501f0c75.pt or a DPT folder; empty: the usual places


@dataclass
class RefinerOptions:
    """The SDXL base -> refiner hand-off (A1111's ``refiner_checkpoint``/``refiner_switch_at``,
    pipelines/refiner.py): the refiner continues the base's sigma schedule from its latents.

    ``checkpoint``: a checkpoint path, or in Python a loaded ``Pipeline``. ``switch_at``: the fraction of
    the denoising done by the base. ``switch_by_steps``: A1111's "Refiner switch by sampling steps" (the
    first step s with s / steps >= switch_at) instead of its default rule by the noise level (the first
    step whose nearest training timestep t has (999 - t) / 1000 >= switch_at)."""

    checkpoint: Any = ""
    switch_at: float = 0.8
    switch_by_steps: bool = False


@dataclass
class X4Options:
    """The x4 upscaler task (pipelines/upscale_x4.py): the low-res image is noised to ``noise_level``
    (0 to 350) before it conditions the model. ``tile``: latent (= input) pixels per tile for large
    inputs (None automatic, 0 never), overlapping by ``tile_overlap``."""

    noise_level: int = 20
    tile: int | None = None
    tile_overlap: int = 32


@dataclass
class NetworkRef:
    """An adapter to apply for this request only: a LoRA/LyCORIS file (``kind="lora"``) or a
    textual-inversion embedding (``kind="embedding"``), by file stem in the pipeline's folders or by path.
    ``<lora:name:te:unet>`` prompt tags become the same refs (pipelines/networks.py)."""

    name: str
    kind: str = "lora"  # "lora" or "embedding" (hypernetworks: not yet available)
    strength: float = 1.0  # UNet strength
    text_strength: float | None = None  # text-encoder strength (None: the same)


@dataclass
class ControlUnit:
    """One ControlNet unit, with the A1111 ControlNet extension's API fields (pipelines/control.py runs it).

    ``model``: a file path, or a file stem in the ControlNet folders (A1111's "name [hash]" accepted);
    ``image``: the control image (PIL image, path, or base64); ``module``: the preprocessor ("none",
    "canny", "depth"); ``control_mode``: 0 balanced, 1 my prompt is more important, 2 ControlNet is more
    important (or those names); ``resize_mode``: 0 just resize, 1 crop and resize, 2 resize and fill (or
    names); ``threshold_a``/``threshold_b``: the preprocessor's parameters (canny: low/high threshold; -1 its
    default); ``processor_res``: the preprocessor's resolution (short side; -1: 512)."""

    model: str
    image: Any = None
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0
    resize_mode: int | str = 1
    threshold_a: float = -1
    threshold_b: float = -1
    processor_res: int = -1


# A1111's flat names of the groups' fields: flat name -> (group, field)
_FLAT = {
    "hr_scale": ("hires", "scale"),
    "hr_upscaler": ("hires", "upscaler"),
    "hr_second_pass_steps": ("hires", "second_pass_steps"),
    "hr_resize_x": ("hires", "resize_x"),
    "hr_resize_y": ("hires", "resize_y"),
    "refiner_checkpoint": ("refiner", "checkpoint"),
    "refiner_switch_at": ("refiner", "switch_at"),
    "refiner_switch_by_steps": ("refiner", "switch_by_steps"),
    "mask": ("inpaint", "mask"),
    "mask_blur": ("inpaint", "mask_blur"),
    "mask_blur_x": ("inpaint", "mask_blur_x"),
    "mask_blur_y": ("inpaint", "mask_blur_y"),
    "inpainting_mask_weight": ("inpaint", "inpainting_mask_weight"),
    "inpainting_fill": ("inpaint", "inpainting_fill"),
    "inpaint_full_res": ("inpaint", "inpaint_full_res"),
    "inpaint_full_res_padding": ("inpaint", "inpaint_full_res_padding"),
    "inpainting_mask_invert": ("inpaint", "inpainting_mask_invert"),
}
_GROUPS = {
    "hires": HiresOptions,
    "refiner": RefinerOptions,
    "inpaint": InpaintOptions,
    "depth": DepthOptions,
    "x4": X4Options,
}
_LISTS = {"networks": NetworkRef, "control": ControlUnit}


@dataclass
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"  # A1111, ComfyUI or latentforge name; "DPM++ 2M Karras" style also works
    schedule: str = "automatic"  # automatic = the sampler's usual schedule, as A1111
    cfg_scale: float = 7.0
    guidance_rescale: float = 0.0  # CFG rescale phi (Lin et al.; diffusers' guidance_rescale), 0: off
    seed: int = -1  # -1: random, reported in the result; image i of the run uses seed + i
    subseed: int = -1  # variation seed (-1: random when subseed_strength > 0); image i uses subseed + i
    subseed_strength: float = 0.0  # 0: no variation; 1: the subseed's noise
    seed_resize_from_w: int = 0  # > 0 with _h: the noise of this size, centred (A1111's "Seed resize from")
    seed_resize_from_h: int = 0
    eta_noise_seed_delta: int = 0  # ENSD: later noise draws use seed + this
    rng: str = "CPU"  # noise source: CPU, GPU (CUDA's torch.randn, reproduced anywhere) or NV
    width: int | None = None  # None: the family's native size
    height: int | None = None
    batch_size: int = 1  # images per denoising pass
    batch_count: int = 1  # passes, one after another
    clip_skip: int | None = None
    denoising_strength: float = 0.75  # img2img, and the hires second pass
    resize_mode: int = 0  # img2img: 0 resize, 1 crop and resize, 2 resize and fill
    eta: float | None = None  # ancestral / DDIM noise (None: the sampler's default)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    s_min_uncond: float = 0.0  # A1111's NGMS: skip the negative prompt below this sigma (every other step)
    s_min_uncond_all: bool = False  # ... at every step
    sgm_noise_multiplier: bool = False  # start txt2img at sqrt(1 + sigma^2) * noise (SGM, ComfyUI, diffusers)
    quantize_timesteps: bool = False  # round the UNet's timestep to an integer step (ComfyUI's convention)
    prompt_syntax: str = "a1111"  # "plain": no emphasis, truncate at 77 tokens
    aesthetic_score: float = 6.0  # SDXL refiner conditioning
    negative_aesthetic_score: float = 2.5
    hires: HiresOptions | None = None
    inpaint: InpaintOptions | None = None
    depth: DepthOptions | None = None
    refiner: RefinerOptions | None = None
    x4: X4Options | None = None
    networks: list[NetworkRef] = field(default_factory=list)
    control: list[ControlUnit] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # fields of other tools: kept in the metadata, not used

    def validate(self, *, img2img: bool = False, upscaler_files: bool = False) -> None:
        """Check every field; ``upscaler_files``: an upscaler folder is configured, so a hires upscaler
        that is not built in may name a model file there (resolved when the plan is built)."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RequestError(message)

        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be a whole number >= 1, got {self.steps!r}")
        need(self.steps <= 1000, f"steps must be at most 1000, got {self.steps}")
        try:
            resolve(self.sampler, self.schedule)
        except ValueError as e:
            raise RequestError(str(e)) from None
        try:
            schedule_name(self.schedule)
        except ValueError as e:
            raise RequestError(str(e)) from None
        need(
            isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale),
            f"cfg_scale must be a finite number, got {self.cfg_scale!r}",
        )
        need(
            isinstance(self.s_min_uncond, (int, float)) and 0 <= self.s_min_uncond <= 1000,
            f"s_min_uncond must be 0 (off) to 1000, got {self.s_min_uncond!r}",
        )
        need(
            isinstance(self.guidance_rescale, (int, float)) and 0 <= self.guidance_rescale <= 1,
            f"guidance_rescale must be between 0 and 1, got {self.guidance_rescale!r}",
        )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                need(
                    isinstance(value, int) and value >= 64 and value % 8 == 0,
                    f"{name} must be a multiple of 8 and at least 64 pixels, got {value!r}",
                )
                need(value <= 8192, f"{name} must be at most 8192 pixels, got {value}")
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 64, "batch_size must be 1 to 64")
        need(isinstance(self.batch_count, int) and 1 <= self.batch_count <= 1000, "batch_count must be 1 to 1000")
        need(
            isinstance(self.seed, int) and -1 <= self.seed < 2**63,
            f"seed must be -1 or a non-negative whole number, got {self.seed!r}",
        )
        need(
            isinstance(self.subseed, int) and -1 <= self.subseed < 2**63,
            f"subseed must be -1 or a non-negative whole number, got {self.subseed!r}",
        )
        s = self.subseed_strength
        need(
            isinstance(s, (int, float)) and math.isfinite(s) and 0 <= s <= 1,
            f"subseed_strength must be between 0 and 1, got {s!r}",
        )
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            v = getattr(self, name)
            need(isinstance(v, int) and -1 <= v <= 8192, f"{name} must be 0 (off) to 8192 pixels, got {v!r}")
        need(
            isinstance(self.eta_noise_seed_delta, int) and 0 <= self.eta_noise_seed_delta < 2**32,
            f"eta_noise_seed_delta must be a whole number from 0 to 2^32 - 1, got {self.eta_noise_seed_delta!r}",
        )
        need(self.rng in RNG_SOURCES, f"rng must be one of {', '.join(RNG_SOURCES)}, got {self.rng!r}")
        need(
            self.clip_skip is None or (isinstance(self.clip_skip, int) and 1 <= self.clip_skip <= 12),
            f"clip_skip must be 1 to 12, got {self.clip_skip!r}",
        )
        if self.hires is not None and not img2img:
            _validate_hires(self.hires, need, upscaler_files)
        if self.refiner is not None:
            _validate_refiner(self.refiner, need)
        if self.x4 is not None:
            _validate_x4(self.x4, need)
        if img2img or self.hires is not None:
            s = self.denoising_strength
            need(
                isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s <= 1.0,
                f"denoising_strength must be between 0 and 1, got {s!r}",
            )
            need(
                not img2img or self.resize_mode in (0, 1, 2),
                "resize_mode must be 0 (resize), 1 (crop and resize) or 2 (resize and fill)",
            )
        need(self.prompt_syntax in ("a1111", "plain"), "prompt_syntax must be 'a1111' or 'plain'")
        if self.inpaint is not None:
            _validate_inpaint(self.inpaint, need, img2img)
        need(self.depth is None or img2img, "depth-to-image needs an init image (img2img) besides the depth map")
        for i, unit in enumerate(self.control):
            _validate_control(i, unit, need)

    def to_dict(self) -> dict:
        """Plain data (groups as nested dicts); ``from_dict`` reads it back. Objects inside groups (a loaded
        refiner ``Pipeline``, a mask image) are kept as they are, not copied."""
        return _plain(self)

    def with_options(self, **options: Any) -> GenerationRequest:
        """A copy with ``options`` (field names, group names or A1111's flat names) applied, strictly."""
        return GenerationRequest.from_dict({**self.to_dict(), **options})

    @classmethod
    def from_dict(cls, data: dict, *, lenient: bool = False) -> GenerationRequest:
        """A request from field names, nested groups and A1111's flat names (``enable_hr``, ``hr_scale``,
        ``refiner_checkpoint``, ``mask``, ...). Unknown fields are an error naming them (the CLI and the
        Python API are strict), or with ``lenient=True`` (for JSON that other tools wrote, such as an
        A1111 API payload) kept in ``extra``."""
        data = _fold_flat(dict(data))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and not lenient:
            raise RequestError(f"unknown request field(s): {', '.join(unknown)}")
        if unknown:
            data["extra"] = {**data.get("extra", {}), **{k: data.pop(k) for k in unknown}}
        for name, group in _GROUPS.items():
            if isinstance(data.get(name), dict):
                data[name] = _make(group, data[name], name)
        for name, item in _LISTS.items():
            if name in data:
                data[name] = [_make(item, x, name) if isinstance(x, dict) else x for x in data[name] or []]
        return cls(**data)


def _fold_flat(data: dict) -> dict:
    """Move A1111's flat names into their groups. A group's flat fields count only when the group is on:
    ``enable_hr`` true, a refiner checkpoint or a mask given, or the group itself given (A1111 clients
    send every field with its default when the feature is off)."""
    flat: dict[str, dict] = {}
    for name in [k for k in data if k in _FLAT]:
        group, key = _FLAT[name]
        flat.setdefault(group, {})[key] = data.pop(name)
    enable_hr = data.pop("enable_hr", None)
    if enable_hr is not None and not enable_hr:
        data["hires"] = None
        flat.pop("hires", None)
    elif enable_hr:
        flat.setdefault("hires", {})
    for group, values in flat.items():
        current = data.get(group)
        if dataclasses.is_dataclass(current):
            current = _plain(current)
        switch = _SWITCH[group]
        if current is not None or (group == "hires" and enable_hr) or (switch and _given(values.get(switch))):
            data[group] = {**(current or {}), **values}
    return data


# the field inside each group whose value switches the group on (hires: enable_hr)
_SWITCH = {"hires": None, "refiner": "checkpoint", "inpaint": "mask", "x4": None}


def _plain(value):
    """``dataclasses.asdict`` without its deep copy of other objects (a Pipeline, an image)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _given(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value)


def _make(cls, values: dict, where: str):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RequestError(f"unknown {where} field(s): {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise RequestError(f"{where}: {e}") from None


# the A1111 ControlNet extension's names of its control and resize modes (the API takes index or name)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODULES = ("none", "canny", "depth")


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


def _validate_control(i: int, u: ControlUnit, need) -> None:
    where = f"control unit {i}"
    need(isinstance(u.model, str) and bool(u.model), f"{where}: 'model' must name a ControlNet file")
    need(u.image is not None, f"{where}: no control image was given ('image')")
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


def _validate_inpaint(o: InpaintOptions, need, img2img: bool) -> None:
    need(img2img, "inpainting and outpainting need an init image (img2img)")
    need(
        o.inpainting_fill in INPAINT_FILL,
        "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)",
    )
    pad = o.inpaint_full_res_padding
    need(isinstance(pad, int) and 0 <= pad <= 1024, f"inpaint_full_res_padding must be 0 to 1024 pixels, got {pad!r}")
    w = o.inpainting_mask_weight
    need(isinstance(w, (int, float)) and 0 <= w <= 1, f"inpainting_mask_weight must be between 0 and 1, got {w!r}")
    for name in ("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom"):
        v = getattr(o, name)
        need(
            isinstance(v, int) and 0 <= v <= 4096 and v % 8 == 0,
            f"{name} must be a multiple of 8 from 0 to 4096 pixels, got {v!r}",
        )
    need(o.mask is not None or any(o.outpaint), "inpainting needs a mask image (white = repaint), or outpaint margins")


def _validate_hires(h: HiresOptions, need, upscaler_files: bool = False) -> None:
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
    upscaler_name(h.upscaler, model_files=upscaler_files)


def _validate_refiner(r: RefinerOptions, need) -> None:
    need(
        isinstance(r.switch_at, (int, float)) and math.isfinite(r.switch_at) and 0.0 <= r.switch_at <= 1.0,
        f"refiner_switch_at must be between 0 and 1, got {r.switch_at!r}",
    )
    need(
        _given(r.checkpoint),
        "refiner_checkpoint must name the refiner's checkpoint file or folder (or be a loaded Pipeline)",
    )
    need(
        isinstance(r.switch_by_steps, bool), f"refiner_switch_by_steps must be true or false, got {r.switch_by_steps!r}"
    )


def _validate_x4(x: X4Options, need) -> None:
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


class GenerationOptions(TypedDict, total=False):
    """The keyword options of ``Pipeline.txt2img``/``img2img``: the request's fields and A1111's flat
    names of the group fields (for editors; ``GenerationRequest`` documents each)."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    schedule: str
    cfg_scale: float
    guidance_rescale: float
    seed: int
    subseed: int
    subseed_strength: float
    seed_resize_from_w: int
    seed_resize_from_h: int
    eta_noise_seed_delta: int
    rng: str
    width: int | None
    height: int | None
    batch_size: int
    batch_count: int
    clip_skip: int | None
    denoising_strength: float
    resize_mode: int
    eta: float | None
    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float
    s_min_uncond: float
    s_min_uncond_all: bool
    sgm_noise_multiplier: bool
    quantize_timesteps: bool
    prompt_syntax: str
    aesthetic_score: float
    negative_aesthetic_score: float
    hires: HiresOptions | None
    inpaint: InpaintOptions | None
    depth: DepthOptions | None
    refiner: RefinerOptions | None
    x4: X4Options | None
    networks: list[NetworkRef]
    control: list[ControlUnit]
    extra: dict
    enable_hr: bool
    hr_scale: float
    hr_upscaler: str
    hr_second_pass_steps: int
    hr_resize_x: int
    hr_resize_y: int
    refiner_checkpoint: str
    refiner_switch_at: float
    refiner_switch_by_steps: bool
    mask: Any
    mask_blur: float
    mask_blur_x: float | None
    mask_blur_y: float | None
    inpainting_mask_weight: float
    inpainting_fill: int
    inpaint_full_res: bool
    inpaint_full_res_padding: int
    inpainting_mask_invert: bool
