"""The A1111 settings of a request that name server files: saved prompt styles (``styles``, from the
server's styles.csv) and the VAE (``sd_vae``); names only, never paths, and errors about the server's own
files without its folders (used by ``sdapi.to_request`` and the routes of ``app.py``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
