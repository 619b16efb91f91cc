"""The A1111 infotext a generation writes: the settings line in ``create_infotext``'s order (A1111 1.10's
modules/processing.py), with the labels, conditions and number style A1111 uses for each field."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

from latentforge.io.hashing import model_hash
from latentforge.io.infotext import format_infotext
from latentforge.pipelines.checks import hires_checkpoint, hires_request
from latentforge.pipelines.request import GenerationRequest, RefinerOptions, X4Options
from latentforge.sampling.registry import resolve, resolve_sampler
from latentforge.sampling.schedules import schedule_name

SCHEDULE_TITLES = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
    "lcm": "LCM",
    "align_your_steps": "Align Your Steps",
    "linear_quadratic": "Linear Quadratic",  # Forge's title (ComfyUI: linear_quadratic)
}


def _model_fields(pipe) -> dict:
    def make() -> dict:
        source = Path(pipe.info.source) if pipe.info else None
        vae = pipe.info.vae_source if pipe.info and pipe.info.vae_source != "checkpoint" else None
        return {
            "Model hash": model_hash(source) if source and source.is_file() else None,
            "Model": source.stem if source and source.is_file() else (source.name if source else None),
            "VAE hash": model_hash(vae) if vae and Path(vae).is_file() else None,
            "VAE": Path(vae).name if vae else None,
        }

    return pipe.cached("infotext model fields", make)


def _mode(mode: str | bool) -> str:
    """ "txt2img", "img2img" or "upscale-x4" (a bool: img2img or not)."""
    if isinstance(mode, bool):
        return "img2img" if mode else "txt2img"
    return mode


# A1111's samplers over timesteps (sd_samplers_timesteps): they never read the scheduler, and name their eta
# "Eta DDIM" (only DDIM and DDIM CFG++ take one)
_TIMESTEP_SAMPLERS = {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}
# the samplers whose config says "uses_ensd" (A1111 writes ENSD only for them, and only when their eta is not 0)
_USES_ENSD = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive"}
# the schedules an A1111 sampler config names for "Automatic" (samplers_k_diffusion options)
_CONFIG_SCHEDULES = {"karras", "exponential"}
# the extras in the order A1111 inserts them before its networks' hashes: a unit's "ControlNet N" (scripts'
# process) first, then p.init's (the hires fields, or img2img's mask fields, API order)
_MASK_FIELDS = ("Mask mode", "Mask blur", "Inpaint area", "Masked area padding", "Masked content")
_NETWORK_FIELDS = ("Lora hashes", "TI hashes")


def _schedule_label(info, sampler: str, schedule: str) -> str | None:
    """The scheduler label A1111's ``KDiffusionSampler.get_sigmas`` writes into the extras for a pass: the
    schedule asked for, or under "Automatic" the sampler config's (Karras, Exponential; a legacy name's
    "Karras"); None where no scheduler runs (Automatic without one; samplers over timesteps)."""
    if info.title in _TIMESTEP_SAMPLERS:
        return None
    if schedule_name(schedule or "automatic") != "automatic":
        return _schedule_title(schedule)
    named = resolve_sampler(sampler)[1]
    chosen = named or (info.schedule if info.schedule in _CONFIG_SCHEDULES else None)
    return SCHEDULE_TITLES[chosen] if chosen else None


def _schedule_title(schedule: str) -> str:
    """A schedule's A1111 label as it was asked for ("Uniform" and "Normal" are two labels of one schedule)."""
    if schedule.strip().lower() == "uniform":
        return "Uniform"
    key = schedule_name(schedule)
    return "Automatic" if key == "automatic" else SCHEDULE_TITLES[key]


def _sampler_settings(req: GenerationRequest, info) -> dict:
    """Eta and the sigma settings, as A1111's ``Sampler.initialize`` writes them: only for a sampler that takes
    the setting, and only when it is not the sampler's default."""
    params = inspect.signature(info.fn).parameters
    eta = params.get("eta")
    fields = {}
    if eta is not None and req.eta is not None and req.eta != eta.default:
        fields["Eta DDIM" if info.title in _TIMESTEP_SAMPLERS else "Eta"] = _num(req.eta)
    for name, key, default in (("s_churn", "Sigma churn", 0.0), ("s_tmin", "Sigma tmin", 0.0),
                               ("s_tmax", "Sigma tmax", math.inf), ("s_noise", "Sigma noise", 1.0)):  # fmt: skip
        value = getattr(req, name)
        if name in params and value is not None and value != default and math.isfinite(value):
            fields[key] = _num(value)
    return fields


def _uses_ensd(req: GenerationRequest, info) -> bool:
    """A1111's ``is_sampler_using_eta_noise_seed_delta``: a sampler flagged "uses_ensd" whose eta is not 0."""
    return info.title in _USES_ENSD and (req.eta if req.eta is not None else 1.0) != 0


def infotext_params(
    pipe,
    req: GenerationRequest,
    seed: int,
    info,
    mode: str | bool,
    refiner: dict | None = None,
    extra: dict | None = None,
    subseed: int | None = None,
) -> dict:
    """The settings line of A1111's infotext, in ``create_infotext``'s order: its fixed fields, then the extras
    in the order A1111 adds them (a ControlNet unit's, the hires or mask fields, the networks' hashes, the
    noise multiplier, the schedule's and the sampler's settings, the refiner's, NGMS), then latentforge's own
    fields (where A1111 has none), then the version. The schedule is written as asked for ("Automatic", or
    the sampler config's), not as resolved, as A1111 does; ``extra`` holds the tasks' fields (plan.infotext:
    the conditional mask weight and token merging ratios among them go to A1111's fixed fields)."""
    from latentforge._version import __version__

    img2img = _mode(mode) == "img2img"
    noise = req.initial_noise_multiplier
    extra = dict(extra or {})
    label = _schedule_label(info, req.sampler, req.schedule)
    params = {
        "Steps": req.steps,
        "Sampler": info.title,
        "Schedule type": label or _schedule_title(req.schedule),
        "CFG scale": _num(req.cfg_scale),
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        **_model_fields(pipe),
        "Variation seed": (req.subseed if subseed is None else subseed) if req.subseed_strength else None,
        "Variation seed strength": _num(req.subseed_strength) if req.subseed_strength else None,
        "Seed resize from": _resize_from(req),
        "Denoising strength": _num(req.denoising_strength) if img2img or req.hires else None,
        "Conditional mask weight": extra.pop("Conditional mask weight", None),
        "Clip skip": req.clip_skip if req.clip_skip and req.clip_skip > 1 else None,
        "ENSD": req.eta_noise_seed_delta if req.eta_noise_seed_delta and _uses_ensd(req, info) else None,
        "Token merging ratio": extra.pop("Token merging ratio", None),
        "Token merging ratio hr": extra.pop("Token merging ratio hr", None),
        "RNG": req.rng if req.rng != "GPU" else None,  # A1111 writes none for its default source
        "Tiling": True if req.tiling else None,
    }
    params.update({k: extra.pop(k) for k in [k for k in extra if k.startswith("ControlNet ")]})
    if req.hires and not img2img:
        params.update(_hires_fields(req, info, label))
    params.update({k: extra.pop(k) for k in (*_MASK_FIELDS, *_NETWORK_FIELDS) if k in extra})
    params["Noise multiplier"] = _num(noise) if img2img and noise != 1 else None
    if "Beta" in (label, params.get("Hires schedule type")):  # get_sigmas adds the Beta scheduler's settings
        params.update({"Beta schedule alpha": "0.6", "Beta schedule beta": "0.6"})  # (schedules.beta's defaults)
    params["SGM noise multiplier"] = True if req.sgm_noise_multiplier else None
    params.update(_sampler_settings(req, info))
    r = refiner if refiner is not None else _refiner_fields(req.refiner) if req.refiner else {}
    params.update({k: r[k] for k in ("Refiner switch by sampling steps", "Refiner", "Refiner switch at") if k in r})
    params["NGMS"] = _num(req.s_min_uncond) if req.s_min_uncond else None
    params["NGMS all steps"] = True if req.s_min_uncond and req.s_min_uncond_all else None
    # latentforge's own fields, after every A1111 one
    params["CFG rescale"] = _num(req.guidance_rescale) if req.guidance_rescale else None
    params.update(_x4_fields(req.x4) if req.x4 else {})
    params.update(extra)
    params["Version"] = f"latentforge {__version__}"
    return params


def _resize_from(req: GenerationRequest) -> str | None:
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        return f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
    return None


def _hires_fields(req: GenerationRequest, info, first_label: str | None) -> dict:
    """A1111's names for the hires fix settings, in the order ``StableDiffusionProcessingTxt2Img.init`` adds
    them; the hires pass's own prompts and sampler are written only where they differ from the first pass's,
    its schedule only where its scheduler label (``_schedule_label``) is one and differs from the first pass's
    (``first_label``), as ``get_sigmas`` does."""
    h = req.hires
    resize = h.resize_x or h.resize_y
    second = hires_request(req)
    hires_info = resolve(second.sampler, second.schedule)[0]
    hires_label = _schedule_label(hires_info, second.sampler, second.schedule)
    other = hires_checkpoint(h)
    return {
        "Hires checkpoint": _short_title(other) if other is not None else None,
        "Hires sampler": hires_info.title if hires_info.name != info.name else None,
        "Hires prompt": second.prompt if second.prompt != req.prompt else None,
        "Hires negative prompt": second.negative_prompt if second.negative_prompt != req.negative_prompt else None,
        "Hires schedule type": hires_label if hires_label is not None and hires_label != first_label else None,
        "Hires upscale": None if resize else _num(h.scale),
        "Hires resize": f"{h.resize_x}x{h.resize_y}" if resize else None,
        "Hires steps": h.second_pass_steps or None,
        "Hires upscaler": h.upscaler,
    }


def _short_title(checkpoint) -> str:
    """A1111's short title of a checkpoint: "name [hash]" (file stem, 10 hex digits of its SHA-256); a
    folder by its name alone."""
    path = Path(str(checkpoint))
    name = path.stem if path.is_file() else path.name
    digest = model_hash(path) if path.is_file() else None
    return f"{name} [{digest}]" if digest else name


def _without_hash(title: str) -> str:
    return title.rsplit(" [", 1)[0] if title.endswith("]") else title


def _refiner_fields(r: RefinerOptions) -> dict:
    """A1111's fields: "Refiner: name [hash]" (its short title), "Refiner switch at", and "Refiner switch by
    sampling steps: True" when that rule was used."""
    return {
        "Refiner": _short_title(r.checkpoint),
        "Refiner switch at": _num(r.switch_at),
        "Refiner switch by sampling steps": True if r.switch_by_steps else None,
    }


def _x4_fields(x: X4Options) -> dict:
    return {"X4 noise level": x.noise_level, "X4 tile": x.tile}


def _num(x: float) -> str:
    """A number as A1111 writes it: a whole number without ".0", other values in full (not rounded)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def infotexts_for(
    pipe,
    req: GenerationRequest,
    seeds: list[int],
    info,
    mode: str | bool,
    extra: dict | None = None,
    refined: bool = True,
) -> list[str]:
    """A1111's infotext of each image; ``extra`` holds the fields the tasks add (Mask blur, ...). Image i
    has the variation seed ``req.subseed + i``. ``refined``: the refiner took over (A1111's apply_refiner
    writes "Refiner" and "Refiner switch at" only when it switches; "Refiner switch by sampling steps" at
    every step)."""
    refiner = _refiner_fields(req.refiner) if req.refiner else None  # hashed once for the batch
    if refiner is not None and not refined:
        refiner = {k: v for k, v in refiner.items() if k == "Refiner switch by sampling steps"}
    return [
        format_infotext(
            req.prompt,
            req.negative_prompt,
            infotext_params(pipe, req, s, info, mode, refiner, extra, subseed=req.subseed + i),
        )
        for i, s in enumerate(seeds)
    ]
