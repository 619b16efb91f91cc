"""The SDXL base -> refiner hand-off (A1111's ``refiner_checkpoint`` + ``refiner_switch_at``).

The base samples the first part of the sigma schedule; at the switch step the refiner continues the
same schedule from the base's latents (not from a decoded image), with no new noise and the same noise
stream (A1111 switches models inside one sampler run), conditioned by its own conditioner (size numbers
and an aesthetic score, ``RefinerConditioner``); the refiner's VAE decodes, as A1111 and diffusers do.
For the same reason an inpainting run's mask blend goes on through the refiner's steps and its final
blend comes after them; an inpainting base's extra input channels stay the base's (A1111 hands them on,
but only a 9-channel UNet concatenates them, so a plain refiner sees the latents alone).

Where the switch falls (``switch_step``), for a pass of n steps over sigmas s_0 > ... > s_n:

- A1111's default (1.7 and later): before the first step i whose nearest training timestep
  t_i = argmin_t |sigma_table[t] - s_i| has (999 - t_i) / 1000 >= switch_at.
- A1111 with "Refiner switch by sampling steps" (the only rule of 1.6): the first step s with
  s / n >= switch_at, i.e. ceil(switch_at * n) in floating point; int(switch_at * n) only when that
  product is whole.
- diffusers (``denoising_end`` on the base, ``denoising_start`` on the refiner): the base keeps the
  timesteps t >= round(1000 - 1000 * denoising_end). This agrees with A1111's default wherever no
  step's timestep lies within half a step of that cutoff (A1111 rounds t to the nearest integer first).

Differences that a separate pass cannot avoid: multistep samplers (DPM++ 2M, ...) start their history
afresh at the switch (as diffusers does; A1111 keeps the base's history), and A1111 can switch between
the two model calls of a second-order step, which here always happens at a step boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentforge.pipelines.plan import Pass, Plan, conditioning
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling import CondSchedule, ModelDenoiser, NoiseSchedule


@dataclass
class HandOff:
    """A checked other model (the refiner, the hires pass's): its family (known before any weight is read)
    and how to get the model."""

    name: str  # what the user gave: a path, or the loaded pipeline's source
    family: object
    load: Callable[[], object]
    loaded: object = None  # the model's pipeline once the pass that runs it has loaded it
    opened: bool = True  # loaded from a path here (False: a loaded Pipeline the caller gave)
    request: object = None  # the hires pass's: the request whose networks are applied to the model
    session: object = None  # those networks, applied (``networks.Session``): closed when the run ends


def open_other(pipe, given, field: str) -> HandOff:
    """Another model for a pass, before any work: a loaded pipeline, or a checkpoint whose family is read
    from its key names and shapes (``pipe.open_model``), loaded only when ``HandOff.load`` is called."""
    if hasattr(given, "unet") and hasattr(given, "family"):
        source = given.info.source if getattr(given, "info", None) else repr(given)
        return HandOff(str(source), given.family, lambda: given, opened=False)
    opener = getattr(pipe, "open_model", None)
    if opener is None:
        raise RequestError(
            f"{field} {given!r}: this pipeline cannot open other checkpoints; "
            "pass the model as a loaded Pipeline (latentforge.load(path))"
        )
    if not Path(str(given)).exists():
        raise RequestError(f"{field} {given!r} does not exist; give a checkpoint file or folder")
    family, load = opener(str(given))
    return HandOff(str(given), family, load)


def prepare(pipe, req: GenerationRequest) -> HandOff:
    """Check the requested refiner before any work (``open_other``); it must share the base's latent space."""
    hand_off = open_other(pipe, req.refiner.checkpoint, "refiner_checkpoint")
    check_family(pipe.family, hand_off.family, hand_off.name)
    if req.hires is not None:
        raise RequestError("the refiner together with Hires. fix is not available; use one of them")
    if req.x4 is not None:
        raise RequestError("the refiner cannot follow the x4 upscaler; use refiner_checkpoint with txt2img or img2img")
    return hand_off


def check_family(base, refiner, name: str, field: str = "refiner_checkpoint") -> None:
    """The refiner continues the base's latents, so it must share its latent space (VAE scale and shape,
    noise schedule) and take no input of its own: for an SDXL base, an SDXL refiner or SDXL base. (Also the
    hires pass's other model when it takes the latents as they are: ``field`` hr_checkpoint_name.)"""
    same_space = (
        refiner.latent_scale == base.latent_scale
        and refiner.vae.downscale == base.vae.downscale
        and refiner.vae.embed_dim == base.vae.embed_dim
        and (refiner.beta_start, refiner.beta_end) == (base.beta_start, base.beta_end)
    )
    if not same_space or refiner.conditioner.needs or refiner.conditioner.concat_channels:
        raise RequestError(
            f"{field} {name}: a {refiner.name} model ({refiner.title}) cannot continue the latents of "
            f"a {base.name} model; choose a model of the same latent space (for SDXL: an SDXL refiner or base)"
        )


def switch_step(sigmas: Tensor, schedule: NoiseSchedule, switch_at: float, by_steps: bool) -> int:
    """How many of the pass's steps the base makes (A1111's rules, see the module docstring)."""
    n = len(sigmas) - 1
    if by_steps:
        return next((s for s in range(n) if not s / n < switch_at), n)
    table = schedule.sigmas.float()  # A1111 compares with the model's float32 table
    for i in range(n):
        t = int(torch.argmin((table - sigmas[i].float()).abs()))
        if (999 - t) / 1000 >= switch_at:
            return i
    return n


def add_pass(plan: Plan, pipe, req: GenerationRequest, hand_off: HandOff) -> Pass | None:
    """Split the plan's last pass at the switch step and append the refiner's pass; None (and the refiner
    is never loaded) when the switch falls after the last step."""
    base = plan.passes[-1]
    full = base.sigmas
    k = switch_step(full, base.model.schedule, req.refiner.switch_at, req.refiner.switch_by_steps)
    if k >= base.steps:
        return None
    refiner = hand_off.loaded = hand_off.load()
    check_family(pipe.family, refiner.family, hand_off.name)
    positive = full[full > 0]
    # one Brownian tree over both passes (an img2img pass's already spans its whole schedule)
    base.noise_range = base.noise_range or (float(positive.min()), float(positive.max()))
    base.sigmas = full[: k + 1]
    calls_per_step = 2 if base.sampler.second_order else 1
    total = len(full) - 1
    cond, uncond = conditioning(refiner, req, plan.width, plan.height, req.batch_size, total * calls_per_step)
    done = k * calls_per_step  # prompt schedules continue where the base stopped
    cond = _shifted(cond, done)
    uncond = None if uncond is None else _shifted(uncond, done)
    schedule = refiner.noise_schedule()
    model = ModelDenoiser(refiner.unet, schedule, refiner.prediction, quantize_timesteps=req.quantize_timesteps)
    refine = Pass(
        "refiner",
        model,
        base.sampler,
        full[k:],
        base.shape,
        cond,
        uncond,
        req.cfg_scale,
        _continue,
        denoise=base.denoise,
        cfg_rescale=base.cfg_rescale,
        min_uncond_sigma=base.min_uncond_sigma,
        min_uncond_all=base.min_uncond_all,
        sampler_options=base.sampler_options,
        continues=True,
    )
    # A1111 switches models inside one CFGDenoiser: its wrappers so far (inpainting's mask blend) go on
    # through the refiner's steps, and the final blend (inpainting's) happens once, after the refiner
    refine.wrappers = list(base.wrappers)
    refine.finish, base.finish = base.finish, None
    plan.passes.append(refine)
    plan.decode = refiner.vae.decode
    return refine


def _shifted(schedule, calls: int):
    """The conditioning (a schedule, or composable parts of schedules) counted from ``calls`` on."""
    if isinstance(schedule, list):
        return [(w, _shifted(s, calls)) for w, s in schedule]
    return CondSchedule([(end - calls, c) for end, c in schedule.entries])


def _continue(iteration: int, previous: Tensor | None, seeds: list[int]) -> Tensor | None:
    return previous
