"""Few-step presets and the checks of the request's fewer-FLOPs options (pipelines/fewer_flops.py runs them).

A preset fills the sampler, steps, CFG scale and schedule that few-step models are made for, wherever the
request does not give them itself; the infotext then carries the individual settings, so other tools
reproduce the image without knowing the preset.

- ``lcm``: LCM-LoRA and LCM-distilled models (Luo et al. 2023, "Latent Consistency Models"; LCM-LoRA,
  Luo et al. 2023): the LCM sampler on the timesteps LCM was distilled on (diffusers' LCMScheduler), 4
  steps, CFG 1.5 (A1111/ComfyUI users run 4-8 steps at CFG 1-2).
- ``turbo``: SD-Turbo / SDXL-Turbo (Sauer et al. 2023, "Adversarial Diffusion Distillation"): one Euler a
  step from the top timestep (ComfyUI's and A1111's "SGM Uniform", diffusers' "trailing" spacing), no
  guidance (CFG 1 here = diffusers' guidance_scale 0).
"""

from __future__ import annotations

import math

from latentforge.pipelines.checks import MAX_STEPS, RequestError, is_int, is_number, show

PRESETS: dict[str, dict[str, object]] = {
    "lcm": {"sampler": "LCM", "steps": 4, "cfg_scale": 1.5, "schedule": "lcm"},
    "turbo": {"sampler": "Euler a", "steps": 1, "cfg_scale": 1.0, "schedule": "sgm_uniform"},
}

DEEPCACHE_SCHEDULES = ("uniform", "non-uniform")
MAX_TOKEN_MERGING_RATIO = 0.9  # A1111's slider; ratios above 0.75 merge what 2 x 2 regions allow (3/4)


def with_preset(data: dict) -> dict:
    """``data`` (request fields) with its ``preset``'s settings filled in where ``data`` does not name them.
    An unknown preset is a RequestError listing the known ones."""
    name = data.get("preset")
    if name in (None, ""):
        return data
    if not isinstance(name, str) or name not in PRESETS:
        raise RequestError(f"preset must be one of {', '.join(PRESETS)} (or empty), got {show(name)}")
    return {**PRESETS[name], **data}


def validate_fewer_flops(req, need) -> None:
    """Types and ranges of the request's preset, token merging and DeepCache fields."""
    need(
        req.preset == "" or req.preset in PRESETS,
        f"preset must be one of {', '.join(PRESETS)} (or empty), got {show(req.preset)}",
    )
    for name in ("token_merging_ratio", "token_merging_ratio_hr", "token_merging_ratio_img2img"):
        value = getattr(req, name)
        need(
            is_number(value) and math.isfinite(value) and 0 <= value <= MAX_TOKEN_MERGING_RATIO,
            f"{name} must be 0 (off) to {MAX_TOKEN_MERGING_RATIO:g}, got {show(value)}",
        )
    need(
        isinstance(req.token_merging_random, bool),
        f"token_merging_random must be true or false, got {show(req.token_merging_random)}",
    )
    need(
        req.token_merging_max_downsample in (1, 2, 4, 8) and is_int(req.token_merging_max_downsample),
        f"token_merging_max_downsample must be 1, 2, 4 or 8, got {show(req.token_merging_max_downsample)}",
    )
    need(
        is_int(req.deepcache_interval) and 0 <= req.deepcache_interval <= MAX_STEPS,
        f"deepcache_interval must be 0 (off) to {MAX_STEPS} steps, got {show(req.deepcache_interval)}",
    )
    need(
        is_int(req.deepcache_depth) and 0 <= req.deepcache_depth <= 64,
        f"deepcache_depth must be a whole number from 0 (the shallowest skip branch), got {show(req.deepcache_depth)}",
    )
    merging = req.token_merging_ratio or req.token_merging_ratio_hr or req.token_merging_ratio_img2img
    need(
        req.x4 is None or not (req.deepcache_interval or merging),
        "DeepCache and token merging are not available for the x4 upscaler; set deepcache_interval and the "
        "token_merging_ratio fields to 0",
    )
    need(
        req.deepcache_schedule in DEEPCACHE_SCHEDULES,
        f"deepcache_schedule must be one of {', '.join(DEEPCACHE_SCHEDULES)}, got {show(req.deepcache_schedule)}",
    )
