"""What to generate: one request dataclass shared by the Python API, the CLI and the HTTP server."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from latentforge.sampling.registry import resolve
from latentforge.sampling.schedules import schedule_name


class RequestError(ValueError):
    """A request that cannot run; the message says which field and what is allowed."""


@dataclass
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"  # A1111, ComfyUI or latentforge name; "DPM++ 2M Karras" style also works
    schedule: str = "automatic"  # automatic = the sampler's usual schedule, as A1111
    cfg_scale: float = 7.0
    seed: int = -1  # -1: random, reported in the result; image i of the run uses seed + i
    width: int | None = None  # None: the family's native size
    height: int | None = None
    batch_size: int = 1  # images per denoising pass
    batch_count: int = 1  # passes, one after another
    clip_skip: int | None = None
    denoising_strength: float = 0.75  # img2img
    resize_mode: int = 0  # img2img: 0 resize, 1 crop and resize, 2 resize and fill
    eta: float | None = None  # ancestral / DDIM noise (None: the sampler's default)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    sgm_noise_multiplier: bool = False  # start txt2img at sqrt(1 + sigma^2) * noise (SGM, ComfyUI, diffusers)
    quantize_timesteps: bool = False  # round the UNet's timestep to an integer step (ComfyUI's convention)
    prompt_syntax: str = "a1111"  # "plain": no emphasis, truncate at 77 tokens
    enable_hr: bool = False  # txt2img "Hires. fix": upscale, then an img2img pass (pipelines/hires.py)
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"  # see hires.LATENT_UPSCALERS and hires.IMAGE_UPSCALERS
    hr_second_pass_steps: int = 0  # 0: the same as steps
    hr_resize_x: int = 0  # a target width instead of hr_scale (0: unused)
    hr_resize_y: int = 0
    aesthetic_score: float = 6.0  # SDXL refiner
    negative_aesthetic_score: float = 2.5
    extra: dict = field(default_factory=dict)  # kept in the metadata, ignored by generation

    def validate(self, *, img2img: bool = False) -> None:
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
            self.clip_skip is None or (isinstance(self.clip_skip, int) and 1 <= self.clip_skip <= 12),
            f"clip_skip must be 1 to 12, got {self.clip_skip!r}",
        )
        if self.enable_hr and not img2img:
            self._validate_hires(need)
        if img2img or self.enable_hr:
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

    def _validate_hires(self, need) -> None:
        from latentforge.pipelines.hires import upscaler_name

        need(
            isinstance(self.hr_scale, (int, float)) and math.isfinite(self.hr_scale) and 0 < self.hr_scale <= 8,
            f"hr_scale must be above 0 and at most 8, got {self.hr_scale!r}",
        )
        steps = self.hr_second_pass_steps
        need(
            isinstance(steps, int) and 0 <= steps <= 1000,
            f"hr_second_pass_steps must be 0 (same as steps) to 1000, got {steps!r}",
        )
        for name in ("hr_resize_x", "hr_resize_y"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and (value == 0 or 64 <= value <= 8192),
                f"{name} must be 0 (unused) or 64 to 8192 pixels, got {value!r}",
            )
        upscaler_name(self.hr_upscaler)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(f"unknown request field(s): {', '.join(unknown)}")
        return cls(**data)
