"""What the A1111 generation routes read and send beside the images: the ``infotext`` field (A1111 1.8 and
later: an image's parameters fill the fields a request leaves out), and the ``info`` and ``parameters``
of the response."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from latentforge._version import __version__
from latentforge.io.hashing import sha256_of
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.server.errors import FieldError

# infotext labels -> (payload field, request attribute) for A1111's ``infotext`` field
_INFOTEXT_FIELDS = {
    "Steps": ("steps", "steps"),
    "CFG scale": ("cfg_scale", "cfg_scale"),
    "Seed": ("seed", "seed"),
    "Denoising strength": ("denoising_strength", "denoising_strength"),
    "Variation seed": ("subseed", "subseed"),
    "Variation seed strength": ("subseed_strength", "subseed_strength"),
    "NGMS": ("s_min_uncond", "s_min_uncond"),
    "Sampler": ("sampler_name", "sampler"),
    "Tiling": ("tiling", "tiling"),
}
# infotext labels -> (A1111 setting, request attribute): settings the infotext sets for this request
_INFOTEXT_SETTINGS = {
    "Clip skip": ("CLIP_stop_at_last_layers", "clip_skip"),
    "ENSD": ("eta_noise_seed_delta", "eta_noise_seed_delta"),
    "RNG": ("randn_source", "rng"),
    "Token merging ratio": ("token_merging_ratio", "token_merging_ratio"),
    "Token merging ratio hr": ("token_merging_ratio_hr", "token_merging_ratio_hr"),
    "Noise multiplier": ("initial_noise_multiplier", "initial_noise_multiplier"),
}


def apply_infotext(p: dict, given: set[str], overrides: dict, img2img: bool) -> list[str]:
    """A1111's ``infotext`` field (1.8+, ``Api.apply_infotext``): an image's parameters fill the fields the
    request did not send (those it sends win), and its settings (Clip skip, ENSD, RNG, token merging) the
    ``override_settings`` it does not name (also the VAE). Values are checked afterwards like sent ones.
    Returns the fields filled (A1111 writes them onto the request, whose echo then shows them)."""
    text = p.get("infotext")
    if not text:
        return []
    from latentforge.io.infotext import parse_infotext
    from latentforge.pipelines.metadata import request_from_infotext

    try:
        req, _ = request_from_infotext(text)
        labels = parse_infotext(text)[2]
    except (RequestError, ValueError) as e:
        raise FieldError("infotext", f"cannot be read: {e}") from None
    found: dict[str, Any] = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}
    for label, (field, attr) in _INFOTEXT_FIELDS.items():
        if label in labels:
            found[field] = getattr(req, attr)
    if "Size" in labels:
        found.update(width=req.width, height=req.height)
    if "Batch size" in labels:  # a paste field of A1111 1.10's txt2img and img2img tabs
        try:
            found["batch_size"] = int(labels["Batch size"])
        except (TypeError, ValueError):
            message = f"cannot be read: Batch size {labels['Batch size']!r} is not a whole number"
            raise FieldError("infotext", message) from None
    if "Seed resize from" in labels:
        found.update(seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h)
    if req.schedule.lower() != "automatic":  # "Schedule type", or a sampler title that names one
        found["scheduler"] = req.schedule
    h = req.hires
    if h is not None and not img2img and "Denoising strength" in labels:  # A1111's test for enable_hr
        found.update(enable_hr=True, hr_scale=h.scale, hr_upscaler=h.upscaler, hr_second_pass_steps=h.second_pass_steps)
        found.update(hr_resize_x=h.resize_x, hr_resize_y=h.resize_y)
        found.update(hr_prompt=h.prompt, hr_negative_prompt=h.negative_prompt)
        found.update(hr_sampler_name=h.sampler or None, hr_scheduler=h.schedule or None)
        found.update(hr_checkpoint_name=h.checkpoint or None)  # a name: resolved in the catalog
    filled = [field for field in found if field in p and field not in given]
    for field in filled:
        p[field] = found[field]
    for label, (setting, attr) in _INFOTEXT_SETTINGS.items():
        if label in labels:
            overrides.setdefault(setting, getattr(req, attr))
    if labels.get("VAE"):  # A1111's sd_vae setting carries infotext "VAE" (a file name of the VAE folders)
        overrides.setdefault("sd_vae", labels["VAE"])
    return filled


def info_json(job, payload: BaseModel, *, model_hash: str | None, model_path: Path | None = None) -> str:
    """A1111's ``info`` string of a finished job (every field sd-backend-client validates); ``model_path``: the
    file or folder of the job's model."""
    req = job.request or job.spec.request
    n = len(job.images)
    seed = req.seed
    subseed = req.subseed if req.subseed != -1 else seed  # (the request carries the subseed drawn: sdapi.py)
    txt2img_only = job.spec.kind != "img2img" and not req.hires
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": seed,
        "all_seeds": list(job.seeds),
        "subseed": subseed,
        "all_subseeds": [subseed + i for i in range(n)],  # A1111: subseed + i, also without variations
        "subseed_strength": req.subseed_strength,
        "width": req.width or 0,
        "height": req.height or 0,
        "sampler_name": _sampler_title(req),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name_for_info(job.model_name, model_path),
        "sd_model_hash": model_hash or "",
        "sd_vae_name": Path(job.vae_path).name if job.vae_path else None,
        "sd_vae_hash": sha256_of(job.vae_path)[:10] if job.vae_path and Path(job.vae_path).is_file() else None,
        # A1111 reports these as the client sent them (0 stays 0, the default is -1)
        "seed_resize_from_w": getattr(payload, "seed_resize_from_w", req.seed_resize_from_w),
        "seed_resize_from_h": getattr(payload, "seed_resize_from_h", req.seed_resize_from_h),
        # A1111 (Processed: getattr(p, "denoising_strength")): txt2img without hires reports what was sent
        "denoising_strength": getattr(payload, "denoising_strength", None) if txt2img_only else req.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(job.infotexts),
        "styles": list(getattr(payload, "styles", None) or []),
        "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": req.clip_skip or 1,
        # A1111: set by the inpainting models' conditioning (txt2img and img2img), whether a mask was given or not
        "is_using_inpainting_conditioning": bool(getattr(job, "inpainting_model", False)),
        "version": f"latentforge {__version__}",
        "job_id": job.id,
        "interrupted": bool(job.stop_flag),
    }
    return json.dumps(info)


def model_name_for_info(name: str | None, path: Path | None) -> str:
    """A1111's ``sd_model_name`` (``CheckpointInfo.name_for_extra``): the checkpoint file's name without its
    folders and extension; a diffusers folder's name as it is."""
    if path is not None and path.is_dir():
        return path.name
    return os.path.splitext(os.path.basename(str(path) if path is not None else name or ""))[0]


def _sampler_title(req: GenerationRequest) -> str:
    from latentforge.sampling.registry import resolve_sampler

    try:
        return resolve_sampler(req.sampler)[0].title
    except ValueError:
        return req.sampler


def echo_parameters(payload: BaseModel) -> dict:
    """The request as A1111 echoes it in ``parameters``: the init images and mask left out unless
    ``include_init_images`` (A1111's img2img API keeps them there then, as sent)."""
    data = payload.model_dump()
    if not data.get("include_init_images"):
        for key in ("init_images", "mask"):
            if key in data:
                data[key] = None
    return data


# image.info keys A1111's read_info_from_image leaves out of png-info's items
_IGNORED_INFO = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                 "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                 "photoshop"}  # fmt: skip
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def png_info(image: Image.Image) -> dict:
    """``POST /sdapi/v1/png-info`` as A1111 answers it: ``info`` the parameters text (a PNG's
    ``parameters`` chunk, or a JPEG's or WebP's EXIF UserComment), ``items`` the image's other text
    entries, ``parameters`` the text parsed, prompts included, a size ``WxH`` as ``KEY-1`` and ``KEY-2``."""
    from latentforge.io.images import read_user_comment
    from latentforge.io.infotext import parse_infotext

    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k not in _IGNORED_INFO}
    text = items.pop("parameters", None)
    comment = read_user_comment(image) if "exif" in image.info else None
    if comment:
        text = comment  # A1111: the EXIF comment wins
        items["exif comment"] = comment
    params: dict[str, str] = {}
    if text:
        prompt, negative, settings = parse_infotext(text)
        params = {"Prompt": prompt, "Negative prompt": negative}
        for key, value in settings.items():
            size = _SIZE.match(value.strip()) if isinstance(value, str) else None
            if size:
                params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
            else:
                params[key] = value
    return {"info": text or "", "items": items, "parameters": params}


def public_record(text: str) -> str:
    """An image's ``latentforge`` record (pipelines/metadata.py ``request_json``) as the server hands it to
    clients: every absolute path in it (the model's source, networks, a hires or refiner model, ControlNet
    files) cut to its file name, so no client learns where the server keeps its files."""
    try:
        data = json.loads(text)
    except ValueError:
        return text

    def clean(value: Any) -> Any:
        if isinstance(value, str) and os.path.isabs(value):
            return Path(value).name
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data))
