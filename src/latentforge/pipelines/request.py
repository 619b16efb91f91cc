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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from latentforge.conditioning.prompt import PromptError, check_prompt, extract_network_tags
from latentforge.pipelines.checks import CONTROL_MODES as CONTROL_MODES  # re-exported (control.py, users)
from latentforge.pipelines.checks import CONTROL_MODULES as CONTROL_MODULES
from latentforge.pipelines.checks import CONTROL_RESIZE_MODES as CONTROL_RESIZE_MODES
from latentforge.pipelines.checks import IMAGE_UPSCALERS as IMAGE_UPSCALERS  # re-exported (hires.py, users)
from latentforge.pipelines.checks import INPAINT_FILL as INPAINT_FILL
from latentforge.pipelines.checks import LATENT_UPSCALERS as LATENT_UPSCALERS
from latentforge.pipelines.checks import (
    MAX_CONTROL_UNITS,
    MAX_NETWORKS,
    MAX_SIDE,
    MAX_STEPS,
    RANGES,
    RequestError,
    check_schedules,
    check_types,
    given,
    hires_request,
    is_int,
    is_number,
    optional,
    python_scalar,
    show,
    validate_control,
    validate_hires,
    validate_inpaint,
    validate_network,
    validate_refiner,
    validate_x4,
)
from latentforge.pipelines.checks import builtin_upscaler as builtin_upscaler
from latentforge.pipelines.checks import mode_index as mode_index
from latentforge.pipelines.checks import upscaler_name as upscaler_name
from latentforge.pipelines.presets import validate_fewer_flops, with_preset
from latentforge.sampling.noise import COMFY_BATCH, MAX_SEED, RNG_SOURCES
from latentforge.sampling.registry import resolve


@dataclass
class HiresOptions:
    """A1111's "Hires. fix" (txt2img): upscale the first pass, then an img2img pass at the larger size
    with the request's ``denoising_strength`` (pipelines/hires.py)."""

    scale: float = 2.0
    upscaler: str | None = None  # LATENT_/IMAGE_UPSCALERS, an ESRGAN model; None: "Latent", not in the infotext
    second_pass_steps: int = 0  # 0: the same as steps
    resize_x: int = 0  # a target width instead of scale (0: unused)
    resize_y: int = 0
    # the hires pass's own (A1111's hr_prompt, ...; empty: the first pass's, see checks.hires_request)
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = ""
    schedule: str = ""
    # A1111's hr_checkpoint_name: another model for the hires pass (a checkpoint path, or in Python a loaded
    # Pipeline; "" or "Use same checkpoint": this one), see pipelines/hires.py
    checkpoint: Any = ""


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
    outpaint_left: int = 0  # outpainting: extend the canvas by these many pixels (multiples of 8)
    outpaint_top: int = 0
    outpaint_right: int = 0
    outpaint_bottom: int = 0
    mask_round: bool = True  # A1111 1.8+: round the latent mask to 0/1 (false: keep the blur's grey levels)

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
    dyn: int | None = None  # LoRA: keep the first dyn ranks (A1111's <lora:name:te:unet:dyn>)


@dataclass
class ControlUnit:
    """One ControlNet unit, with the A1111 ControlNet extension's API fields (pipelines/control.py runs it).

    ``model``: a file path, or a file stem in the ControlNet folders (A1111's "name [hash]" accepted);
    ``image``: the control image (PIL image, path, or base64); ``module``: the preprocessor ("none",
    "canny", "depth", "softedge_hed", "softedge_hedsafe"; old names "hed", "hed_safe"); ``control_mode``:
    0 balanced, 1 my prompt is more important, 2 ControlNet is more important (or those names);
    ``resize_mode``: 0 just resize, 1 crop and resize, 2 resize and fill (or names);
    ``threshold_a``/``threshold_b``: the preprocessor's parameters (canny: low/high threshold; -1 its
    default); ``processor_res``: the preprocessor's resolution (short side; -1: 512);
    ``effective_region_mask``: where the unit acts (an image or path: its first channel, white = fully),
    as the extension scales each residual by it; ``pixel_perfect``: the preprocessor's resolution from the
    image and each pass's size (the extension's rule, ``processor_res`` unused); ``hr_option``: "Both",
    "Low res only" or "High res only" (the passes of a hires fix the unit controls);
    ``inpaint_crop_input_image``: in "only masked" img2img inpainting, cut the unit's input to the masked
    area as the generation is (the extension's default); off, the whole input is fitted to the crop."""

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
    effective_region_mask: Any = None
    pixel_perfect: bool = False
    hr_option: str = "Both"
    inpaint_crop_input_image: bool = True


# A1111's flat names of the groups' fields: flat name -> (group, field)
LORA_KINDS = ("lora", "lyco")  # prompt tags <lora:...>, <lyco:...>
HYPERNET_KINDS = ("hypernet", "hypernetwork")


_FLAT = {
    "hr_scale": ("hires", "scale"),
    "hr_upscaler": ("hires", "upscaler"),
    "hr_second_pass_steps": ("hires", "second_pass_steps"),
    "hr_resize_x": ("hires", "resize_x"),
    "hr_resize_y": ("hires", "resize_y"),
    "hr_prompt": ("hires", "prompt"),
    "hr_negative_prompt": ("hires", "negative_prompt"),
    "hr_sampler_name": ("hires", "sampler"),
    "hr_scheduler": ("hires", "schedule"),
    "hr_checkpoint_name": ("hires", "checkpoint"),
    "refiner_checkpoint": ("refiner", "checkpoint"),
    "refiner_switch_at": ("refiner", "switch_at"),
    "refiner_switch_by_steps": ("refiner", "switch_by_steps"),
    "mask": ("inpaint", "mask"),
    "mask_blur": ("inpaint", "mask_blur"),
    "mask_blur_x": ("inpaint", "mask_blur_x"),
    "mask_blur_y": ("inpaint", "mask_blur_y"),
    "inpainting_fill": ("inpaint", "inpainting_fill"),
    "inpaint_full_res": ("inpaint", "inpaint_full_res"),
    "inpaint_full_res_padding": ("inpaint", "inpaint_full_res_padding"),
    "inpainting_mask_invert": ("inpaint", "inpainting_mask_invert"),
    "mask_round": ("inpaint", "mask_round"),
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
    cfg_scale: float | None = None  # None: the model's default (Family.default_cfg: 7, demo 2; DDIM CFG++ 7)
    guidance_rescale: float = 0.0  # CFG rescale phi (Lin et al.; diffusers' guidance_rescale), 0: off
    seed: int = -1  # -1: random, reported; image i uses seed + i (with subseed_strength: seed, and subseed + i)
    subseed: int = -1  # variation seed (-1: random when subseed_strength > 0); image i uses subseed + i
    subseed_strength: float = 0.0  # 0: no variation; 1: the subseed's noise
    seed_resize_from_w: int = 0  # > 0 with _h: the noise of this size, centred (A1111's "Seed resize from")
    seed_resize_from_h: int = 0
    eta_noise_seed_delta: int = 0  # ENSD: later noise draws use seed + this
    rng: str = "CPU"  # noise source: CPU, GPU (CUDA's torch.randn, reproduced anywhere), NV, or "comfy batch"
    width: int | None = None  # None: the family's native size
    height: int | None = None
    batch_size: int = 1  # images per denoising pass
    batch_count: int = 1  # passes, one after another
    clip_skip: int | None = None
    denoising_strength: float = 0.75  # img2img, and the hires second pass
    initial_noise_multiplier: float = 1.0  # img2img: A1111's "Noise multiplier" of the starting noise
    img2img_fix_steps: bool = False  # img2img runs exactly `steps` (of int(steps / strength)): A1111's setting
    # inpainting models' "Conditional mask weight" (A1111's setting): how much of the init image (masked area;
    # no mask: all of it; hires pass: the upscaled image) they see cleared; 1: all, 0: the image as it is
    inpainting_mask_weight: float = 1.0
    resize_mode: int = 0  # img2img: 0 resize, 1 crop and resize, 2 resize and fill, 3 latent upscale (no mask)
    eta: float | None = None  # ancestral / DDIM noise (None: the sampler's default)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    s_min_uncond: float = 0.0  # A1111's NGMS: skip the negative prompt below this sigma (every other step)
    s_min_uncond_all: bool = False  # ... at every step
    sgm_noise_multiplier: bool = False  # start txt2img at sqrt(1 + sigma^2) * noise (SGM, ComfyUI, diffusers)
    quantize_timesteps: bool = False  # round the UNet's timestep to an integer step (ComfyUI's convention)
    tiling: bool = False  # A1111's Tiling: seamless, tileable images (UNet and VAE pad circularly, nn/circular.py)
    prompt_syntax: str = "a1111"  # "plain": no emphasis, truncate at 77 tokens
    aesthetic_score: float = 6.0  # SDXL refiner conditioning
    negative_aesthetic_score: float = 2.5
    # fewer FLOPs, each off by default (pipelines/fewer_flops.py, presets.py)
    preset: str = ""  # "lcm" or "turbo": sampler, steps, cfg_scale and schedule where not given
    token_merging_ratio: float = 0.0  # ToMe (A1111's "Token merging ratio"); 0: off
    token_merging_ratio_hr: float = 0.0  # the hires pass's (0: token_merging_ratio)
    token_merging_ratio_img2img: float = 0.0  # img2img's (0: token_merging_ratio)
    token_merging_random: bool = False  # random destinations, seeded by the batch's first seed (A1111: off)
    token_merging_max_downsample: int = 1  # merge in blocks downsampled at most this much: 1, 2, 4, 8 (SDXL: 2)
    deepcache_interval: int = 0  # DeepCache: the full UNet every N steps, the shallow part between; 0: off
    deepcache_depth: int = 0  # DeepCache's skip branch (0: the shallowest)
    deepcache_schedule: str = "uniform"  # or "non-uniform" (the paper's quadratic 1:N schedule)
    hires: HiresOptions | None = None
    inpaint: InpaintOptions | None = None
    depth: DepthOptions | None = None
    refiner: RefinerOptions | None = None
    x4: X4Options | None = None
    networks: list[NetworkRef] = field(default_factory=list)
    control: list[ControlUnit] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # fields of other tools: kept in the metadata, not used

    def validate(self, *, img2img: bool = False, upscaler_files: bool = False) -> None:
        """Check every field's type and range (and the prompts' limits) before any work; a RequestError
        names the field, what it got and what is allowed. ``upscaler_files``: an upscaler folder is
        configured, so a hires upscaler that is not built in may name a model file there (resolved when
        the plan is built)."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RequestError(message)

        check_types(GenerationRequest, {f.name: getattr(self, f.name) for f in fields(self)})
        for name, group in _GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, group):
                check_types(group, asdict(value), f"{name}.")
        need(is_int(self.steps) and self.steps >= 1, f"steps must be a whole number >= 1, got {show(self.steps)}")
        need(self.steps <= MAX_STEPS, f"steps must be at most {MAX_STEPS}, got {show(self.steps)}")
        for name in ("prompt", "negative_prompt", "sampler", "schedule", "prompt_syntax"):
            value = getattr(self, name)
            need(isinstance(value, str), f"{name} must be text, got {type(value).__name__} {show(value)}")
        for name in ("prompt", "negative_prompt"):
            try:
                check_prompt(getattr(self, name), name)
            except PromptError as e:
                raise RequestError(str(e)) from None
        hires = self.hires is not None and not img2img and isinstance(self.hires, HiresOptions)
        if hires:
            validate_hires(self.hires, need, upscaler_files)
            need(not hires_networks_differ(self), HIRES_NETWORKS)
        second = hires_request(self) if hires else None
        try:
            sampler, _ = resolve(self.sampler, self.schedule)
        except ValueError as e:
            raise RequestError(str(e)) from None
        hires_sampler = sampler
        if second is not None:
            for name, schedule in (("hr_sampler_name", None), ("hr_scheduler", second.schedule)):
                try:
                    hires_sampler = resolve(second.sampler, schedule)[0]
                except ValueError as e:
                    raise RequestError(f"{name}: {e}") from None
        need(self.prompt_syntax in ("a1111", "plain"), "prompt_syntax must be 'a1111' or 'plain'")
        if self.prompt_syntax == "a1111":  # the parsers' limits, checked before any model work
            calls = self.steps * (2 if sampler.second_order else 1)
            parsed: set[str] = set()
            check_schedules(self, calls, parsed=parsed)
            if second is not None:  # the hires pass goes on from the first pass's timeline (A1111 1.7+)
                per_step = 2 if hires_sampler.second_order else 1
                check_schedules(second, (self.hires.second_pass_steps or self.steps) * per_step, calls, parsed)
        need(
            self.cfg_scale is None
            or (is_number(self.cfg_scale) and math.isfinite(self.cfg_scale) and abs(self.cfg_scale) <= 100),
            f"cfg_scale must be a finite number from -100 to 100 (or none: the model's default), got "
            f"{show(self.cfg_scale)}",
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
                    is_int(value) and value >= 64 and value % 8 == 0,
                    f"{name} must be a multiple of 8 and at least 64 pixels, got {show(value)}",
                )
                need(value <= MAX_SIDE, f"{name} must be at most {MAX_SIDE} pixels, got {show(value)}")
        need(is_int(self.batch_size) and 1 <= self.batch_size <= 64, "batch_size must be 1 to 64")
        need(is_int(self.batch_count) and 1 <= self.batch_count <= 1000, "batch_count must be 1 to 1000")
        images = self.batch_size * self.batch_count
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            need(
                is_int(value) and -1 <= value <= MAX_SEED,
                f"{name} must be -1 (random) or a whole number from 0 to 2^64 - 1, got {show(value)}",
            )
            counts = (name == "subseed") == bool(self.subseed_strength)  # which one goes up per image (A1111)
            need(
                not counts or value + images - 1 <= MAX_SEED,
                f"{name} {value}: the run's last image would use {name} {value} + {images - 1}, above 2^64 - 1, "
                f"the largest seed; use a smaller {name} or fewer images",
            )
        s = self.subseed_strength
        need(
            is_number(s) and math.isfinite(s) and 0 <= s <= 1,
            f"subseed_strength must be between 0 and 1, got {show(s)}",
        )
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            v = getattr(self, name)
            need(is_int(v) and -1 <= v <= MAX_SIDE, f"{name} must be 0 (off) to 8192 pixels, got {show(v)}")
        need(
            is_int(self.eta_noise_seed_delta) and 0 <= self.eta_noise_seed_delta < 2**32,
            f"eta_noise_seed_delta must be a whole number from 0 to 2^32 - 1, got {show(self.eta_noise_seed_delta)}",
        )
        need(self.rng in RNG_SOURCES, f"rng must be one of {', '.join(RNG_SOURCES)}, got {show(self.rng)}")
        if self.rng == COMFY_BATCH:  # ComfyUI's whole-batch noise has none of A1111's per-image settings
            resized = self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0
            for name, used in (
                ("subseed_strength", self.subseed_strength != 0),
                ("seed_resize_from_w/_h", resized),
                ("eta_noise_seed_delta", self.eta_noise_seed_delta != 0),
            ):
                need(
                    not used,
                    f"{name} is A1111's per-image noise setting and does not apply to rng {COMFY_BATCH!r} "
                    "(ComfyUI's whole-batch noise); remove it or choose rng CPU, GPU or NV",
                )
        need(
            self.clip_skip is None or (is_int(self.clip_skip) and 1 <= self.clip_skip <= 12),
            f"clip_skip must be 1 to 12, got {show(self.clip_skip)}",
        )
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if value is None and name == "eta":
                continue
            ok = is_number(value) and low <= value <= high and (math.isfinite(value) or name == "s_tmax")
            need(ok, f"{name} must be between {low:g} and {high:g}, got {show(value)}")
        for name in ("sgm_noise_multiplier", "quantize_timesteps", "tiling", "img2img_fix_steps"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {show(value)}")
        need(
            is_int(self.resize_mode) and self.resize_mode in (0, 1, 2, 3),
            "resize_mode must be 0 (resize), 1 (crop and resize), 2 (resize and fill) or 3 (just resize, latent "
            f"upscale), got {show(self.resize_mode)}",
        )
        latent_resize = "resize_mode 3 (latent upscale) cannot be used with"  # (A1111 fits masks in pixels)
        need(self.resize_mode != 3 or self.inpaint is None, f"{latent_resize} a mask or outpainting; use 0, 1 or 2")
        need(self.resize_mode != 3 or self.x4 is None, f"{latent_resize} the x4 upscaler; use 0, 1 or 2")
        need(isinstance(self.extra, dict), f"extra must be a mapping of names to values, got {show(self.extra)}")
        for name, group in _GROUPS.items():
            value = getattr(self, name)
            need(
                value is None or isinstance(value, group),
                f"{name} must be a group of options ({', '.join(f.name for f in fields(group))}) or none, "
                f"got {show(value)}",
            )
        for name, item in _LISTS.items():
            value = getattr(self, name)
            need(
                isinstance(value, list) and all(isinstance(x, item) for x in value),
                f"{name} must be a list of {item.__name__} entries, got {show(value)}",
            )
        for i, ref in enumerate(self.networks):
            validate_network(f"networks[{i}] ({show(ref.name)})", ref, need)
        tagged = refs_from_tags(extract_network_tags(self.prompt)[1])
        for ref in tagged:  # <lora:name:w> tags, before loading
            validate_network(f"prompt: <{ref.kind}:{ref.name}>", ref, need)
        count = len(self.networks) + len(tagged)  # a LoRA twice is one at the strengths' sum
        need(count <= MAX_NETWORKS, f"the request applies {count} networks (tags and list); at most {MAX_NETWORKS}")
        if self.refiner is not None:
            validate_refiner(self.refiner, need)
            need(self.hires is None, "the refiner together with Hires. fix is not available; use one of them")
        if self.x4 is not None:
            validate_x4(self.x4, need)
        if self.inpaint is not None:
            validate_inpaint(self.inpaint, need, img2img)
        need(self.depth is None or img2img, "depth-to-image needs an init image (img2img) besides the depth map")
        count = len(self.control) if isinstance(self.control, list) else 0
        need(count <= MAX_CONTROL_UNITS, f"at most {MAX_CONTROL_UNITS} ControlNet units, got {count}")
        for i, unit in enumerate(self.control):
            validate_control(i, unit, need, img2img)
        validate_fewer_flops(self, need)

    def to_dict(self) -> dict:
        """Plain data (groups as nested dicts); ``from_dict`` reads it back. Objects inside groups (a loaded
        refiner ``Pipeline``, a mask image) are kept as they are, not copied."""
        return _plain(self)

    def with_options(self, **options: Any) -> GenerationRequest:
        """A copy with ``options`` (field names, group names or A1111's flat names) applied, strictly; a
        ``preset`` among them fills only what neither ``options`` name."""
        return GenerationRequest.from_dict({**self.to_dict(), **with_preset(options)})

    @classmethod
    def from_dict(cls, data: dict, *, lenient: bool = False) -> GenerationRequest:
        """A request from field names, nested groups and A1111's flat names (``enable_hr``, ``hr_scale``,
        ``refiner_checkpoint``, ``mask``, ...). Unknown fields are an error naming them (the CLI and the
        Python API are strict), or with ``lenient=True`` (for JSON that other tools wrote, such as an
        A1111 API payload) kept in ``extra``."""
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise RequestError(f"a request must be a mapping of field names to values, got {show(data)}")
        data = {k: python_scalar(v) for k, v in data.items()}  # numpy numbers (a slider's, an array's) as Python's
        for name in [*_GROUPS, *_LISTS]:
            value = data.get(name)
            group_ok = value is None or isinstance(value, dict) or dataclasses.is_dataclass(value)
            need = list if name in _LISTS else None
            if (need and not isinstance(value, (list, type(None)))) or (not need and not group_ok):
                raise RequestError(f"{name} must be {'a list' if need else 'a group of options'}, got {show(value)}")
        if not isinstance(data.get("enable_hr", False), (bool, type(None))):
            raise RequestError(f"enable_hr must be true or false, got {show(data['enable_hr'])}")
        if not isinstance(data.get("extra", {}), dict):
            raise RequestError(f"extra must be a mapping of names to values, got {show(data['extra'])}")
        data = with_preset(_fold_flat(dict(data)))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and not lenient:
            raise RequestError(f"unknown request field(s): {', '.join(unknown)}")
        if unknown:
            data["extra"] = {**data.get("extra", {}), **{k: data.pop(k) for k in unknown}}
        if lenient:  # other tools write null for "the default" (A1111: s_tmax)
            data = {k: v for k, v in data.items() if v is not None or optional(cls, k)}
        for name, group in _GROUPS.items():
            if isinstance(data.get(name), dict):
                data[name] = _make(group, data[name], name)
        for name, item in _LISTS.items():
            if name in data:
                data[name] = [_make(item, x, name) if isinstance(x, dict) else x for x in data[name] or []]
        check_types(cls, data)
        return cls(**data)


def refs_from_tags(tags: list[tuple[str, list[str]]]) -> list[NetworkRef]:
    """Prompt tags (kind, items) -> NetworkRefs, by A1111's reading of positional and named items."""
    refs = []
    for kind, items in tags:
        if kind not in (*LORA_KINDS, *HYPERNET_KINDS):
            raise RequestError(f"<{kind}:...> prompt tags are not available in this version of latentforge")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        if not positional or not positional[0].strip():
            raise RequestError(f"a <{kind}:...> tag needs a name, e.g. <{kind}:name:0.8>")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise RequestError(f"<{kind}:{':'.join(items)}>: the weights must be numbers") from None
        if kind in HYPERNET_KINDS:  # <hypernet:name:multiplier>
            refs.append(NetworkRef(positional[0].strip(), "hypernet", strength=te))
            continue
        dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)  # A1111's extra_networks_lora
        try:
            dyn = None if dyn is None else int(dyn)
        except ValueError:
            raise RequestError(f"<{kind}:{':'.join(items)}>: dyn must be a whole number, not {dyn!r}") from None
        refs.append(NetworkRef(positional[0].strip(), "lora", strength=unet, text_strength=te, dyn=dyn))
    return refs


def _fold_flat(data: dict) -> dict:
    """Move A1111's flat names into their groups. A group's flat fields count only when the group is on:
    ``enable_hr`` true, a refiner checkpoint or a mask given, or the group itself given (A1111 clients
    send every field with its default when the feature is off)."""
    flat: dict[str, dict] = {}
    for name in [k for k in data if k in _FLAT]:
        group, key = _FLAT[name]
        value = data.pop(name)
        if value is None and name in _SAME_WHEN_NONE:  # A1111's default None: the first pass's
            value = ""
        flat.setdefault(group, {})[key] = value
    enable_hr = data.pop("enable_hr", None)
    if enable_hr is not None and not enable_hr:
        data["hires"] = None
        flat.pop("hires", None)
    elif enable_hr:
        flat.setdefault("hires", {})
    inpaint = data.get("inpaint")
    if isinstance(inpaint, dict) and "inpainting_mask_weight" in inpaint:  # its earlier place (saved records)
        inpaint = data["inpaint"] = dict(inpaint)
        weight = inpaint.pop("inpainting_mask_weight")
        data.setdefault("inpainting_mask_weight", weight)
    for group, values in flat.items():
        current = data.get(group)
        if dataclasses.is_dataclass(current):
            current = _plain(current)
        switch = _SWITCH[group]
        if current is not None or (group == "hires" and enable_hr) or (switch and given(values.get(switch))):
            data[group] = {**(current or {}), **values}
    return data


HIRES_NETWORKS = (
    "hr_prompt names other networks (<lora:...>, <hypernet:...>) than the prompt; switching networks between "
    "the passes is not available: put the same tags in both prompts, or leave hr_prompt empty"
)
_SAME_WHEN_NONE = ("hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler")


def hires_networks_differ(req) -> bool:
    """The hires prompt names other networks than the prompt (A1111 switches networks between the passes;
    here both passes run with the prompt's, so such a request is refused)."""
    h = req.hires
    if h is None or not isinstance(h.prompt, str) or not h.prompt or not isinstance(req.prompt, str):
        return False
    ours, theirs = (refs_from_tags(extract_network_tags(t)[1]) for t in (req.prompt, h.prompt))
    return sorted(map(repr, ours)) != sorted(map(repr, theirs))


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


def _make(cls, values: dict, where: str):
    allowed = {f.name for f in fields(cls)}
    if not all(isinstance(k, str) for k in values):
        raise RequestError(f"{where} field names must be text, got {show(list(values))}")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RequestError(f"unknown {where} field(s): {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    check_types(cls, values, f"{where}.")
    try:
        return cls(**values)
    except TypeError as e:
        raise RequestError(f"{where}: {e}") from None
