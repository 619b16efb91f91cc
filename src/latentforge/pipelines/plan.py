"""Generation as values: a ``Plan`` is a list of ``Pass`` values that the one loop in generate.py runs.

A pass says everything one sampling run needs: the model denoiser (network + parameterisation, with any
model wrappers such as control networks), the sampler and its sigmas, the latent shape, both sides of
CFG as conditioning schedules, where its starting latent comes from (pure noise, init latents, or the
previous pass's result), and denoiser wrappers (e.g. masked blending for inpainting). Tasks build or
extend plans (txt2img/img2img here, hires.py adds a second pass); none of them touches the loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from latentforge.conditioning.prompt import split_and
from latentforge.conditioning.schedule import prompt_schedule
from latentforge.pipelines.checks import MAX_STEPS
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import CFGDenoiser, CondSchedule, ModelDenoiser, NoiseSchedule, get_sigmas
from latentforge.sampling.denoisers import Denoiser, WrappedDenoiser
from latentforge.sampling.noise import NoiseOptions
from latentforge.sampling.registry import SamplerInfo

# (iteration, previous pass's latents or None, the batch's seeds) -> this pass's starting latents, or
# None for pure noise
Start = Callable[[int, Tensor | None, list[int]], Tensor | None]
# (iteration, the batch's seeds) -> the batch's extra input channels (B, c, h, w)
BatchConcat = Callable[[int, list[int]], Tensor]


@dataclass
class Pass:
    """One sampling pass over a batch."""

    name: str  # "txt2img", "img2img", "hires", ...
    model: ModelDenoiser
    sampler: SamplerInfo
    sigmas: Tensor  # the sigmas this pass steps through (img2img: from its start sigma), ending at 0
    shape: tuple[int, int, int]  # latent (C, h, w)
    cond: CondSchedule | list[tuple[float, CondSchedule]]  # a list: composable parts (A1111's AND)
    uncond: CondSchedule | None
    cfg_scale: float
    start: Start
    cfg_rescale: float = 0.0  # CFG rescale phi
    min_uncond_sigma: float = 0.0  # A1111's NGMS (s_min_uncond)
    min_uncond_all: bool = False
    denoise: bool = True  # False: the starting latents are the result (the hires pass at denoising strength 0)
    sgm_noise: bool = False  # pure-noise start at sqrt(1 + sigma^2) * noise instead of sigma * noise
    noise_multiplier: float = 1.0  # a start from init latents adds this times the noise (A1111's img2img)
    sampler_options: dict = field(default_factory=dict)
    wrappers: list[Callable[[Denoiser], Denoiser]] = field(default_factory=list)  # around the CFG denoiser
    finish: Callable[[Tensor], Tensor] | None = None  # applied to the pass's result (inpainting's blend)
    # per-batch extra input channels replacing the Cond's concat on both CFG sides (x4: noised low-res images)
    batch_concat: BatchConcat | None = None
    # continue the previous pass: start from its latents as they are (no new noise) and keep drawing from its
    # noise stream (the refiner hand-off, which A1111 makes inside one sampler run)
    continues: bool = False
    noise_range: tuple[float, float] | None = None  # Brownian trees' sigma range (None: this pass's sigmas)
    # called before each batch runs this pass, with (iteration, the batch's seeds): per-batch state of
    # wrappers (fewer_flops.py: DeepCache's kept features, ToMe's seeded generator)
    before_batch: list[Callable[[int, list[int]], None]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def denoiser(self, concat: Tensor | None = None) -> Denoiser:
        """A fresh guided denoiser (prompt schedules count model calls from the start of each pass);
        ``concat`` replaces the extra input channels of every conditioning entry."""
        cond, uncond = self.cond, self.uncond
        if concat is not None:
            cond = _with_concat(cond, concat)
            uncond = None if uncond is None else _with_concat(uncond, concat)
        guided = CFGDenoiser(
            self.model, cond, uncond, self.cfg_scale, self.cfg_rescale, self.min_uncond_sigma, self.min_uncond_all
        )
        d: Denoiser = guided
        for wrap in self.wrappers:
            d = wrap(d)
        return d if d is guided else WrappedDenoiser(d, guided)  # CFG++ samplers reach last_uncond


@dataclass
class Plan:
    """The passes of one generation, run in order for each batch, and how their result becomes pixels."""

    passes: list[Pass]
    width: int
    height: int
    decode: Callable[[Tensor], Tensor]  # final latents -> images in [-1, 1]
    sampler: SamplerInfo
    schedule: str  # the schedule's canonical name (batching compares plans by it)
    noise: NoiseOptions = field(default_factory=NoiseOptions)  # noise source, variation seeds, ENSD
    # decoded 8-bit images of one batch (and the batch's index) -> the output images (inpainting's overlay)
    postprocess: Callable[[list[Image.Image], int], list[Image.Image]] | None = None
    # the decoded images in [0, 1] before they become 8-bit (ControlNet inpaint_only's blend), or None
    finish_pixels: Callable[[Tensor], Tensor] | None = None
    infotext: dict = field(default_factory=dict)  # further infotext fields the tasks add (A1111's names)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.passes)


def pass_sigmas(info: SamplerInfo, schedule_name: str, schedule: NoiseSchedule, steps: int) -> Tensor:
    """The full sigma schedule of ``steps`` for a sampler."""
    if info.discard_penultimate_sigma:  # A1111 does this for DPM2 / DPM2 a / DPM++ 3M SDE
        sigmas = get_sigmas(schedule_name, schedule, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return get_sigmas(schedule_name, schedule, steps)


MAX_FIXED_SCHEDULE = 10 * MAX_STEPS  # the fixed-steps rule's whole schedule (steps / strength) at most


def fixed_steps_schedule(steps: int, strength: float) -> int:
    """A1111's ``setup_img2img_steps`` fixed-steps branch (its hires pass, and img2img with the
    ``img2img_fix_steps`` setting): the schedule has ``int(steps / min(strength, 0.999))`` steps and its last
    ``steps`` run (``fixed_steps``). A tiny strength would ask for a vast schedule: refused above
    ``MAX_FIXED_SCHEDULE``."""
    total = int(steps / min(strength, 0.999))
    if total > MAX_FIXED_SCHEDULE:
        raise RequestError(
            f"{steps} steps at denoising strength {strength:g} run from a schedule of {total} steps; at most "
            f"{MAX_FIXED_SCHEDULE} are made: raise the strength or lower the steps"
        )
    return total


def fixed_steps(full: Tensor, steps: int) -> Tensor:
    """The last ``steps`` steps of a whole schedule (sigmas[total - t_enc - 1:] with t_enc = steps - 1); a
    schedule that made fewer sigmas than asked (lcm, ddim_uniform, beta's merged steps) runs all it has."""
    return full[max(0, len(full) - 1 - steps) :]


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """A1111's rule (``setup_img2img_steps``): t_enc = int(min(strength, 0.999) * steps), and the sampler runs
    from sigmas[steps - t_enc - 1], i.e. t_enc + 1 steps: strength 0 still makes one step, from the last
    nonzero sigma."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1 :]


def noise_options(req: GenerationRequest, latent_factor: int) -> NoiseOptions:
    """A1111's noise settings of a request."""
    resize = None
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        resize = (req.seed_resize_from_w, req.seed_resize_from_h)
    return NoiseOptions(req.rng, req.subseed_strength, resize, req.eta_noise_seed_delta, latent_factor)


def sampler_options(req: GenerationRequest) -> dict:
    opts = dict(s_churn=req.s_churn, s_tmin=req.s_tmin, s_tmax=req.s_tmax, s_noise=req.s_noise)
    if req.eta is not None:
        opts["eta"] = req.eta
    return opts


def conditioning(
    pipe,
    req: GenerationRequest,
    width: int,
    height: int,
    batch: int,
    total_calls: int | None = None,
    concat: Tensor | None = None,
    inputs: dict | None = None,
    first_pass_calls: int | None = None,
) -> tuple[CondSchedule, CondSchedule | None]:
    """Both sides of CFG for one pass of ``batch`` images (the prompt is the same for each), as
    schedules over ``total_calls`` model calls: A1111's prompt editing ``[a:b:when]`` and alternation
    ``[a|b]`` give several entries (conditioning/schedule.py), a plain prompt one. The family's
    conditioner turns the encoded text into ``Cond`` (vector, extra channels: ``concat`` when the task
    made them, else the conditioner's default); ``inputs`` are the task's own keyword inputs for a
    conditioner that needs them (the x4 upscaler's ``noise_level``). ``first_pass_calls``: this is a
    hires pass, whose prompt editing goes on from a first pass of that many calls (A1111 1.7+)."""
    conditioner = pipe.family.conditioner
    if conditioner.needs and concat is None and inputs is None:
        raise RequestError(
            f"{pipe.family.name} models need their own input ({conditioner.needs}); "
            "txt2img and img2img are not available for them"
        )
    total = total_calls or req.steps
    if concat is None and inputs is None:
        concat = conditioner.default_concat(pipe.vae, width, height, pipe.device)
    adm = pipe.unet.config.adm_in_channels
    encoded: dict[str, object] = {}

    def make(text: str, aesthetic: float, negative: bool):
        if text not in encoded:
            encoded[text] = pipe.encode_prompt(text, clip_skip=req.clip_skip, syntax=req.prompt_syntax)
        emb = encoded[text]
        return conditioner.build(
            emb.context,
            emb.pooled,
            width=width,
            height=height,
            adm_channels=adm,
            aesthetic=aesthetic,
            empty_negative=negative and not text.strip(),
            concat=concat,
            batch=batch,
            **(inputs or {}),
        )

    def schedule(text: str, aesthetic: float, negative: bool) -> CondSchedule:
        if req.prompt_syntax != "a1111":
            return CondSchedule([(total, make(text, aesthetic, negative))])
        entries = prompt_schedule(text, total, first_pass_calls)
        return CondSchedule([(end, make(t, aesthetic, negative)) for end, t in entries])

    parts = split_and(req.prompt) if req.prompt_syntax == "a1111" else [(req.prompt, 1.0)]
    if len(parts) == 1 and parts[0][1] == 1.0:
        cond = schedule(parts[0][0], req.aesthetic_score, False)
    else:  # composable diffusion: each part its own conditioning (A1111's AND)
        cond = [(weight, schedule(text, req.aesthetic_score, False)) for text, weight in parts]
    plain = not isinstance(cond, list)
    uncond = None
    if req.cfg_scale != 1.0 or not plain:
        uncond = schedule(req.negative_prompt, req.negative_aesthetic_score, True)
    return cond, uncond


def first_pass(
    pipe,
    req: GenerationRequest,
    info: SamplerInfo,
    schedule_name: str,
    width: int,
    height: int,
    init_latents: Tensor | None = None,
    concat: Tensor | None = None,
) -> Pass:
    """The txt2img pass (from pure noise) or, with ``init_latents`` (one per image, cycled over the
    batch), the img2img pass with A1111's step rule. ``concat``: the model's extra input channels made
    by the task (one image)."""
    schedule = pipe.noise_schedule()
    fixed = init_latents is not None and req.img2img_fix_steps and req.denoising_strength > 0
    total = fixed_steps_schedule(req.steps, req.denoising_strength) if fixed else req.steps
    sigmas = pass_sigmas(info, schedule_name, schedule, total)
    calls_per_step = 2 if info.second_order else 1  # A1111 lays prompt schedules over model calls
    cond, uncond = conditioning(pipe, req, width, height, req.batch_size, req.steps * calls_per_step, concat)
    down = pipe.vae.config.downscale
    shape = (pipe.unet.config.out_channels, height // down, width // down)
    model = ModelDenoiser(pipe.unet, schedule, pipe.prediction, quantize_timesteps=req.quantize_timesteps)
    if init_latents is None:
        start: Start = _no_start
        name = "txt2img"
    noise_range = None
    if init_latents is not None:
        if info.brownian:  # A1111's create_noise_sampler(x, sigmas, p): the whole schedule's range
            positive = sigmas[sigmas > 0]
            noise_range = (float(positive.min()), float(sigmas.max()))
        sigmas = fixed_steps(sigmas, req.steps) if fixed else img2img_sigmas(sigmas, req.steps, req.denoising_strength)
        start = _cycled(init_latents, req.batch_size)
        name = "img2img"
    step = Pass(
        name,
        model,
        info,
        sigmas,
        shape,
        cond,
        uncond,
        req.cfg_scale,
        start,
        cfg_rescale=req.guidance_rescale,
        min_uncond_sigma=req.s_min_uncond,
        min_uncond_all=req.s_min_uncond_all,
        sgm_noise=req.sgm_noise_multiplier,
        noise_multiplier=1.0 if init_latents is None else req.initial_noise_multiplier,
        sampler_options=sampler_options(req),
    )
    step.noise_range = noise_range
    return step


def _with_concat(schedule, concat: Tensor):
    """The conditioning (a schedule, or composable parts of schedules) with other extra channels."""
    if isinstance(schedule, list):
        return [(w, _with_concat(s, concat)) for w, s in schedule]
    return CondSchedule([(end, dataclasses.replace(c, concat=concat)) for end, c in schedule.entries])


def _no_start(iteration: int, previous: Tensor | None, seeds: list[int]) -> None:
    return None


def _cycled(latents: Tensor, batch: int) -> Start:
    def start(iteration: int, previous: Tensor | None, seeds: list[int]) -> Tensor:
        return latents[[(iteration * batch + b) % len(latents) for b in range(batch)]]

    return start


def starting_latent(p: Pass, init: Tensor | None, first_noise: Tensor | None) -> Tensor:
    """Where sampling starts: init latents noised to the first sigma, or pure noise at that sigma; a
    continuing pass starts from the previous latents as they are."""
    s0 = float(p.sigmas[0])
    if init is not None:
        return init + first_noise * (p.noise_multiplier * s0) if p.denoise and not p.continues else init
    return first_noise * (math.sqrt(1 + s0**2) if p.sgm_noise else s0)
