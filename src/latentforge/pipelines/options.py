"""``GenerationOptions``: the keyword options of ``Pipeline.txt2img``/``img2img`` typed for editors (the
request's fields and A1111's flat names; ``tests/test_request.py`` keeps them in step with the request)."""

from __future__ import annotations

from typing import Any, TypedDict

from latentforge.pipelines.request import (
    ControlUnit,
    DepthOptions,
    HiresOptions,
    InpaintOptions,
    NetworkRef,
    RefinerOptions,
    X4Options,
)


class GenerationOptions(TypedDict, total=False):
    """The keyword options of ``Pipeline.txt2img``/``img2img``: the request's fields and A1111's flat
    names of the group fields (for editors; ``GenerationRequest`` documents each)."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    schedule: str
    cfg_scale: float | None
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
    initial_noise_multiplier: float
    img2img_fix_steps: bool
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
    tiling: bool
    prompt_syntax: str
    aesthetic_score: float
    negative_aesthetic_score: float
    preset: str
    token_merging_ratio: float
    token_merging_ratio_hr: float
    token_merging_ratio_img2img: float
    token_merging_random: bool
    token_merging_max_downsample: int
    deepcache_interval: int
    deepcache_depth: int
    deepcache_schedule: str
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
    hr_upscaler: str | None
    hr_second_pass_steps: int
    hr_resize_x: int
    hr_resize_y: int
    hr_prompt: str
    hr_negative_prompt: str
    hr_sampler_name: str
    hr_scheduler: str
    hr_checkpoint_name: Any  # another model for the hires pass: a path or a loaded Pipeline
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
    mask_round: bool
