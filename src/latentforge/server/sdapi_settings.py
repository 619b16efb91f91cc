"""The A1111 settings of a request that name server files: saved prompt styles (``styles``, from the
server's styles.csv) and the VAE (``sd_vae``); names only, never paths, and errors about the server's own
files without its folders (used by ``sdapi.to_request`` and the routes of ``app.py``). Also A1111's sampler
settings (s_churn, s_tmin, s_tmax, s_noise, s_min_uncond, eta_ancestral, eta_ddim: ``sampler_fields``)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentforge.pipelines.checks import show
from latentforge.server.errors import FieldError

log = logging.getLogger("latentforge.server")


def _refuse(field: str, message: str) -> None:
    raise FieldError(field, message)


def apply_styles(p: dict, styles: Callable[[], dict] | None) -> None:
    """A1111's saved styles (``styles``: names of the server's styles.csv) applied in order to the prompt,
    the negative prompt and the hires pass's own ones (``conditioning.styles``; an empty hr_prompt is the
    styled prompt), before the networks are taken out of the text, as A1111's ``setup_prompts``."""
    from latentforge.conditioning.prompt import PromptError
    from latentforge.conditioning.styles import StylesFileError, UnknownStyleError, apply_styles_to_passes

    try:
        known = styles() if styles is not None else {}
        texts = [p.get(k) or "" for k in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")]
        if not p.get("enable_hr"):
            texts[2:] = ["", ""]
        styled = apply_styles_to_passes(tuple(texts), p["styles"], known)
        p["prompt"], p["negative_prompt"] = styled[:2]
        if p.get("enable_hr"):
            p["hr_prompt"], p["hr_negative_prompt"] = styled[2:]
    except UnknownStyleError as e:
        _refuse("styles", f"{e.args[0]} (/sdapi/v1/prompt-styles lists them)")
    except StylesFileError as e:  # the server's own file: the client hears its name, the log the rest
        log.warning("styles: %s", e)
        _refuse("styles", f"the server's styles file cannot be read: {styles_error(e)}")
    except (PromptError, TypeError, ValueError) as e:
        _refuse("styles", str(e))


def styles_error(e: Exception) -> str:
    """A styles file's error for a client: the file by its name, not its place on the server."""
    path = getattr(e, "path", None)
    text = str(e)
    return text.replace(str(path), path.name) if path is not None else without_folders(text)


_FOLDERS = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s,:;'\"]+)+[\\/]")


def without_folders(message: str) -> str:
    """``message`` with the folders of the paths in it taken out (file names stay): server paths are not
    for clients."""
    return _FOLDERS.sub("", message)


def request_vae(value: Any, sent: bool, vaes: dict[str, Path]) -> str:
    """The VAE of one request: an unknown ``override_settings.sd_vae`` the client sent is a 400; one that
    came from an infotext's "VAE" or the server's stored setting (whose file may be gone) falls back to the
    checkpoint's own, as A1111 ("Couldn't find VAE named ...; using None instead"), logged."""
    if sent:
        return vae_choice(value, "override_settings.sd_vae", vaes)
    try:
        return vae_choice(value, "sd_vae", vaes)
    except FieldError as e:
        log.warning("%s; the checkpoint's own VAE is used", e)
        return "None"


def vae_choice(value: Any, field: str, vaes: dict[str, Path]) -> str:
    """A1111's ``sd_vae`` setting as the worker takes it: "Automatic" (A1111's rule, ``ModelCache.vae_path``:
    the first listed VAE named like the checkpoint, else its own), "None" (the checkpoint's own) or a VAE
    file name of ``vaes`` (a stem is accepted); never a path."""
    if value in (None, "", "Automatic", "auto"):  # "auto": A1111's name before 1.0
        return "Automatic"
    if value == "None":
        return "None"
    if not isinstance(value, str):
        _refuse(field, f"must be a VAE name from /sdapi/v1/sd-vae, 'Automatic' or 'None', got {value!r}")
    if "/" in value or "\\" in value or ".." in value:
        _refuse(field, f"{value[:80]!r} is a path; give a VAE name as /sdapi/v1/sd-vae lists")
    if value in vaes:
        return value
    stems = [name for name in vaes if Path(name).stem == value]
    if len(stems) == 1:
        return stems[0]
    known = ", ".join(sorted(vaes)[:20]) or "none (give --vae-dir, or models/VAE beside --models-dir)"
    _refuse(field, f"unknown VAE {value[:80]!r}; known: {known}, or 'Automatic' or 'None' (files are listed as added)")


# A1111's sampler settings (POST /sdapi/v1/options, override_settings) -> the request field each fills
SAMPLER_SETTINGS = {
    "s_churn": "s_churn",
    "s_tmin": "s_tmin",
    "s_tmax": "s_tmax",  # 0: no upper bound
    "s_noise": "s_noise",
    "s_min_uncond": "s_min_uncond",  # NGMS
    "eta_ancestral": "eta",  # eta of the ancestral (k-diffusion) samplers
    "eta_ddim": "eta",  # eta of A1111's samplers over timesteps (DDIM, DDIM CFG++)
}
# A1111's Sampler defaults of the sigma settings, and the samplers it passes them to (sd_samplers_kdiffusion's
# sampler_extra_params: a setting other than the default wins over the request's value there, initialize())
_SIGMA_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
_CHURN_SAMPLERS = {"Euler", "Heun", "DPM2"}
_NOISE_SAMPLERS = _CHURN_SAMPLERS | {"DPM fast", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"}
_NOISE_SAMPLERS |= {"DPM++ 2M SDE Heun"}
_ETA_DDIM = {"DDIM", "DDIM CFG++"}  # CompVisSampler's eta_option_field "eta_ddim" (PLMS, UniPC take no eta)


def check_sampler_settings(values: dict, prefix: str = "") -> None:
    """The A1111 sampler settings among ``values``, checked as the request fields they fill are checked."""
    from latentforge.pipelines.request import GenerationRequest, RequestError

    for theirs, ours in SAMPLER_SETTINGS.items():
        if theirs not in values:
            continue
        value = values[theirs]
        if theirs == "s_tmax" and value == 0 and not isinstance(value, bool):
            value = math.inf
        try:
            GenerationRequest.from_dict({"prompt": "", ours: value}).validate()
        except (RequestError, TypeError, ValueError) as e:
            message = str(e)  # "<our field> must be ...": the field error names A1111's field first
            _refuse(prefix + theirs, message.removeprefix(ours + " ") if message.startswith(ours + " ") else message)


def sampler_fields(p: dict, settings: dict, sampler: str) -> dict[str, Any]:
    """The request's sampler fields (s_churn, s_tmin, s_tmax, s_noise, s_min_uncond, eta) with A1111's settings
    applied as A1111 1.10 does:

    - ``fill_fields_from_opts``: s_min_uncond and the sigma settings are the request's, else the setting's;
    - ``Sampler.initialize``: for a sampler A1111 passes a sigma setting to (``sampler_extra_params``), a setting
      other than the sampler's default wins over the request's value; other samplers ignore the setting;
    - eta, when the request gives none: ``eta_ddim`` for DDIM samplers, ``eta_ancestral`` for the others that
      take an eta (A1111's k-diffusion ones, whose default eta is 1); set only where it differs from the
      sampler's default, as A1111 writes "Eta" to the infotext only then.

    A value A1111 would pass to a sampler that latentforge's version of it cannot take is refused, not dropped."""
    import inspect

    from latentforge.sampling.registry import resolve_sampler

    try:
        info = resolve_sampler(sampler)[0]
        params = inspect.signature(info.fn).parameters
    except (ValueError, TypeError):  # an unknown sampler: the request's own check names it
        info, params = None, {}
    title = info.title if info is not None else ""
    out: dict[str, Any] = {}
    for name, default in _SIGMA_DEFAULTS.items():
        sent = p.get(name)
        value = default if sent is None else sent
        if name == "s_tmax":
            value = value or math.inf  # A1111: 0 or unset means no upper bound
        takes = title in (_NOISE_SAMPLERS if name == "s_noise" else _CHURN_SAMPLERS)
        setting = settings.get(name)
        if takes and setting is not None:
            setting = (setting or math.inf) if name == "s_tmax" else setting
            if setting != default:
                value = setting
        if takes and value != default and name not in params:
            _refuse(name, f"{title} in latentforge does not take {name} (A1111 passes it); leave it at {default}")
        out[name] = value
    ngms = p.get("s_min_uncond")
    ngms = settings.get("s_min_uncond") if ngms is None else ngms
    if ngms:
        out["s_min_uncond"] = ngms
    eta = p.get("eta")
    if eta is None and "eta" in params:
        option = "eta_ddim" if title in _ETA_DDIM else "eta_ancestral"
        default = params["eta"].default
        value = settings.get(option)
        if value is not None and (option == "eta_ddim" or default == 1.0) and value != default:
            eta = value
    out["eta"] = eta
    return out


# A1111's img2img settings that change images and that latentforge does not reproduce: refused by name when a
# request would run with a value other than A1111's default (never silently dropped)
_IMG2IMG_UNSUPPORTED = {
    "img2img_color_correction": (False, "colour correction of img2img results"),
    "img2img_background_color": ("#ffffff", "another colour behind transparent init pixels"),
    "upscaler_for_img2img": (None, "an upscaler for img2img's resize"),
    "img2img_extra_noise": (0.0, "extra noise added to img2img's starting latent"),
}


# A1111's other settings that change images, at their defaults in A1111 1.10 (its compatibility options, the
# emphasis mode, the VAE's approximations, padded conds): latentforge runs the defaults; another value is
# refused by name, on every request and in POST /sdapi/v1/options
_UNSUPPORTED = {
    "use_old_emphasis_implementation": (False, "the old emphasis implementation"),
    "use_old_karras_scheduler_sigmas": (False, "the old Karras scheduler sigmas"),
    "no_dpmpp_sde_batch_determinism": (False, "DPM++ SDE without batch determinism"),
    "use_old_hires_fix_width_height": (False, "the old hires fix width and height"),
    "dont_fix_second_order_samplers_schedule": (False, "the unfixed schedule of second-order samplers"),
    "hires_fix_use_firstpass_conds": (False, "the first pass's conditioning for the hires pass"),
    "use_old_scheduling": (False, "the old prompt-editing timelines"),
    "always_discard_next_to_last_sigma": (False, "discarding the next-to-last sigma for every sampler"),
    "pad_cond_uncond": (False, "padding the prompt and negative prompt to the same length"),
    "pad_cond_uncond_v0": (False, "padding the prompt and negative prompt to the same length (v0)"),
    "emphasis": ("Original", "another emphasis mode"),
    "comma_padding_backtrack": (20, "another comma padding backtrack"),
    "sd_vae_encode_method": ("Full", "an approximate VAE encoder"),
    "sd_vae_decode_method": ("Full", "an approximate VAE decoder"),
}
# settings that are true or false (anything else would be taken as one of them without a word)
_BOOLEAN_SETTINGS = {"img2img_fix_steps", "img2img_color_correction", "s_min_uncond_all", "sgm_noise_multiplier"}


def unsupported_settings(settings: dict, img2img: bool = True) -> dict[str, Any]:
    """Refuse (a FieldError naming it) a setting latentforge cannot run at a value other than A1111's default
    (``_UNSUPPORTED``; with ``img2img`` also img2img's) or a true/false setting of another type; returns the
    request field A1111's img2img settings give (``img2img_fix_steps``; ``inpainting_mask_weight`` is one of
    sdapi's ``_SETTING_FIELDS``, read by txt2img too)."""
    for name in _BOOLEAN_SETTINGS & set(settings):
        if not isinstance(settings[name], bool) and settings[name] is not None:
            _refuse(name, f"{name} must be true or false, got {show(settings[name])}")
    table = {**_UNSUPPORTED, **(_IMG2IMG_UNSUPPORTED if img2img else {})}
    for name, (default, what) in table.items():
        value = settings.get(name, default)
        white = name == "img2img_background_color" and str(value).lower() in ("#ffffff", "#fff", "white")
        if white or value in (default, None, "None", "") or (value is False and default is False):
            continue
        _refuse(name, f"{what} ({name} = {show(value)}) is not available in latentforge; set it back to {default!r}")
    return {"img2img_fix_steps": True} if img2img and settings.get("img2img_fix_steps") is True else {}
