"""AUTOMATIC1111's API payloads (``/sdapi/v1``) <-> latentforge's ``GenerationRequest`` and results.

Field names follow A1111's ``StableDiffusionTxt2ImgProcessingAPI``/``Img2Img`` models (defaults as there);
``sampler_name``/``sampler_index`` and ``scheduler`` become ``sampler``/``schedule``, ``n_iter`` becomes
``batch_count``. A1111's settings that change images (``_SETTING_FIELDS``: clip skip, ENSD, the noise
source, token merging, ...; the sampler settings s_churn, s_tmin, s_tmax, s_noise, s_min_uncond,
eta_ancestral and eta_ddim, ``sdapi_settings.sampler_fields``) come from the server's options
(``POST /sdapi/v1/options``) with the request's ``override_settings`` winning, which may also switch the
model (``sd_model_checkpoint``); the ``infotext`` field fills what the request leaves out
(``sdapi_meta.apply_infotext``). Fields we cannot honour (restore_faces, scripts) are refused with a
message naming them, never silently dropped;
fields of other tools are kept in the request's ``extra`` (``GenerationRequest.from_dict(...,
lenient=True)``). ``image_cfg_scale`` is accepted and unused, as A1111 does for models other than
instruct-pix2pix.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.server.errors import FieldError, non_finite
from latentforge.server.sdapi_control import control_units
from latentforge.server.sdapi_meta import apply_infotext, echo_parameters, info_json, public_record  # noqa: F401
from latentforge.server.sdapi_settings import (
    apply_styles,
    check_sampler_settings,
    request_vae,
    sampler_fields,
    unsupported_settings,
)
from latentforge.server.sdapi_settings import styles_error as styles_error  # re-exported (app.py)
from latentforge.server.sdapi_settings import vae_choice as vae_choice


class _Payload(BaseModel):
    """Fields both generation endpoints share (A1111's names and defaults); other fields are kept."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Clients send ``null`` for fields they leave at the default (webuiapi, sd-backend-client). A
        bool is not a number (``"steps": true`` would run 1 step); numbers written as strings are read
        as A1111's own models read them."""
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, bool) and k in _NUMBER_FIELDS.get(cls, ()):
                    raise ValueError(f"{k} must be a number, got {v!r}")
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float | None = None  # None: the model's default (7 as A1111's API; the demo model 2)
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgPayload(_Payload):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgPayload(_Payload):
    """``POST /sdapi/v1/img2img`` (with A1111's inpainting fields)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    mask_round: bool = True


class PngInfoPayload(BaseModel):
    image: str  # required, as in A1111's PNGInfoRequest


# quantities, where a bool is a client's mistake; A1111's 0/1 choices (inpainting_mask_invert,
# inpainting_fill, resize_mode, ...) take false and true, as A1111's own test payloads send them
_QUANTITIES = {
    "steps", "width", "height", "batch_size", "n_iter", "cfg_scale", "seed", "subseed", "subseed_strength",
    "initial_noise_multiplier",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "eta", "s_churn", "s_tmax", "s_tmin",
    "s_noise", "s_min_uncond", "refiner_switch_at", "hr_scale", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "mask_blur", "mask_blur_x", "mask_blur_y", "inpaint_full_res_padding",
}  # fmt: skip
_NUMBER_FIELDS = {m: _QUANTITIES & set(m.model_fields) for m in (Txt2ImgPayload, Img2ImgPayload)}

# A1111 fields that are handled here (so they do not end up in ``extra``)
_HANDLED = set(Img2ImgPayload.model_fields) | set(Txt2ImgPayload.model_fields)


class PixelBudget:
    """The decoded pixels of one request's images together (init images, mask, ControlNet images): each
    image at most ``max_pixels``, all of them at most ``IMAGES_PER_REQUEST`` times that."""

    IMAGES_PER_REQUEST = 8  # a batch of init images, a mask and ControlNet images at the largest size

    def __init__(self, max_pixels: int):
        self.max_pixels, self.left = max_pixels, max_pixels * self.IMAGES_PER_REQUEST

    def take(self, field: str, w: int, h: int) -> None:
        if w * h > self.left:
            raise FieldError(
                field,
                f"the images of this request hold more than {self.max_pixels * self.IMAGES_PER_REQUEST} pixels "
                f"together ({self.IMAGES_PER_REQUEST} times the limit of one image); send fewer or smaller images",
            )
        self.left -= w * h


# the image formats a client sends (A1111's page and clients: PNG, JPEG, WebP; photos, scans, GIFs): never
# PostScript/EPS (PIL hands it to Ghostscript) or the rarer decoders
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # (JPEG includes MPO photos)


def decode_image(data: Any, field: str, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """A base64 image (raw or a ``data:`` URL) -> a loaded PIL image. The header is read first: images
    above ``max_pixels`` (decompression bombs) are refused before their pixels are decoded, and so are
    images past the request's ``budget``."""
    if not isinstance(data, str) or not data:
        raise FieldError(field, "expected a base64-encoded image (raw or a data: URL)")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None
    too_large = f"at most {max_pixels} pixels are accepted (--max-image-pixels)"
    try:
        im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise FieldError(field, f"the image declares more pixels than PIL will decode; {too_large}") from None
    except MemoryError:
        raise
    except Exception as e:  # any decoder's error (a DDS's NotImplementedError too): the client's data
        why = "" if isinstance(e, Image.UnidentifiedImageError) else f" ({str(e)[:120]})"
        formats = ", ".join(IMAGE_FORMATS)
        raise FieldError(field, f"is not an image in a format the server reads ({formats}){why}") from None
    w, h = im.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise FieldError(field, f"the image is {w}x{h}; {too_large}")
    if budget is not None:
        budget.take(field, w, h)
    try:
        im.load()
    except MemoryError:
        raise
    except Exception as e:  # any decoder's error: the client's data
        raise FieldError(field, f"the image cannot be decoded: {type(e).__name__}: {str(e)[:120]}") from None
    return im


def encode_png(image: Image.Image) -> str:
    """Raw base64 (no prefix) of a PNG carrying the image's ``parameters`` and ``latentforge`` text (the
    latter without the server's paths: ``sdapi_meta.public_record``)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if image.info.get("parameters"):
        info.add_text("parameters", str(image.info["parameters"]))
    if image.info.get("latentforge"):  # the server's paths cut to file names
        info.add_text("latentforge", public_record(str(image.info["latentforge"])))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _refuse(field: str, message: str) -> None:
    raise FieldError(field, message)


def to_request(
    payload: _Payload,
    *,
    img2img: bool,
    options: dict,
    max_pixels: int,
    upscaler_files: bool = False,
    controlnets: dict[str, Path] | None = None,
    max_output_pixels: int | None = None,
    vaes: dict[str, Path] | None = None,
    styles: Callable[[], dict] | None = None,
) -> tuple[GenerationRequest, list[Image.Image] | None, str | None, str]:
    """(request, init images or None, model name from override_settings or None, the VAE: "Automatic",
    "None" or a name of ``vaes``, from the settings, override_settings or the infotext). The server's limits
    on what one request may cost are checked here, for every endpoint that generates: ``max_pixels`` per
    input image (and ``PixelBudget`` for all of them), ``max_output_pixels`` for the images of one pass
    (width x height x batch_size, after hires), at most batch_size init images, and no file paths in
    the names of upscalers and prompt networks."""
    p = payload.model_dump()
    extra = {k: v for k, v in (payload.model_extra or {}).items()}
    budget = PixelBudget(max_pixels)
    _check_unsupported(p)
    _check_names(p)
    _check_numbers(p, img2img)
    raw = p.get("override_settings") or {}
    if not isinstance(raw, dict):
        _refuse("override_settings", "must be an object of option names and values")
    overrides = dict(raw)  # the infotext may add settings for this request
    check_sampler_settings(overrides, "override_settings.")
    filled = apply_infotext(p, payload.model_fields_set, overrides, img2img)
    for name in filled:  # A1111 writes them onto the request: the response's `parameters` shows them
        setattr(payload, name, p[name])
    if p.get("infotext"):
        payload.override_settings = overrides
    _check_names(p)  # again: the infotext may have filled the prompts
    model = overrides.get("sd_model_checkpoint") or None
    settings = {**options, **overrides}  # A1111: the server's settings, override_settings win for this request
    clip_skip = settings.get("CLIP_stop_at_last_layers", 1)
    vae = request_vae(settings.get("sd_vae"), "sd_vae" in raw, vaes or {})
    sampler = p["sampler_name"] or p["sampler_index"] or "Euler"
    if p.get("styles"):
        apply_styles(p, styles)
        _check_names(p)  # the styles' text may name networks
    if extra.get("disable_extra_networks"):  # A1111: the prompts' <lora:...> tags cut out, nothing applied
        from latentforge.conditioning.prompt import extract_network_tags

        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            if isinstance(p.get(name), str):
                p[name] = extract_network_tags(p[name])[0]
    data: dict[str, Any] = {
        "prompt": p["prompt"],
        "negative_prompt": p["negative_prompt"],
        "seed": p["seed"],
        "sampler": sampler,
        "schedule": p["scheduler"] or "automatic",
        "batch_size": p["batch_size"],
        "batch_count": p["n_iter"],
        "steps": p["steps"],
        "cfg_scale": p["cfg_scale"],
        "width": p["width"],
        "height": p["height"],
        "clip_skip": None if clip_skip in (None, 0, 1) else clip_skip,
        **sampler_fields(p, settings, sampler),  # with the sampler settings (s_churn, eta_ancestral, ...)
        # A1111 (process_images_inner): these names mean no refiner
        "refiner_checkpoint": None if p["refiner_checkpoint"] in ("", "None", "none") else p["refiner_checkpoint"],
        "tiling": bool(p["tiling"]),
    }
    if p["refiner_switch_at"] is not None:
        data["refiner_switch_at"] = p["refiner_switch_at"]
    img2img_only = () if img2img else ("initial_noise_multiplier",)  # A1111 reads it in img2img's sample only
    data.update({b: settings[a] for a, b in _SETTING_FIELDS.items() if a in settings and b not in img2img_only})
    if not img2img:
        unsupported_settings(settings, img2img=False)  # (img2img's below, with its own)
    data["subseed"] = p.get("subseed", -1)
    if p.get("subseed_strength"):  # A1111's variation seeds (a subseed of -1: random, drawn by the run)
        data["subseed_strength"] = p["subseed_strength"]
    elif not 0 <= data["subseed"] < 2**64:  # unused; -1 drawn and reported as A1111 does (get_fixed_seed)
        data["subseed"] = secrets.randbelow(4294967294)
    if (p.get("seed_resize_from_w") or 0) > 0 and (p.get("seed_resize_from_h") or 0) > 0:
        data.update(seed_resize_from_w=p["seed_resize_from_w"], seed_resize_from_h=p["seed_resize_from_h"])
    control = control_units(p, controlnets or {}, max_pixels, budget, decode_image, img2img)
    if control:
        data["control"] = control
    if img2img:
        data["denoising_strength"] = 0.75 if p["denoising_strength"] is None else p["denoising_strength"]
        data["resize_mode"] = p["resize_mode"]
        if p["initial_noise_multiplier"] is not None:  # else the setting's (options, override_settings)
            data["initial_noise_multiplier"] = p["initial_noise_multiplier"]
        if p.get("mask"):
            blur = p["mask_blur"]
            data.update(
                mask=decode_image(p["mask"], "mask", max_pixels, budget),
                mask_blur=blur if blur is not None else 4,
                inpainting_fill=p["inpainting_fill"],
                inpaint_full_res=bool(p["inpaint_full_res"]),
                inpaint_full_res_padding=p["inpaint_full_res_padding"],
                inpainting_mask_invert=bool(p["inpainting_mask_invert"]),
                mask_round=p["mask_round"],
            )
            if blur is None:
                data.update(mask_blur_x=p["mask_blur_x"], mask_blur_y=p["mask_blur_y"])
        data.update(unsupported_settings(settings))  # img2img_fix_steps; the refused ones
        images = p.get("init_images")
        if not images:
            _refuse("init_images", "img2img needs at least one init image (base64 PNG/JPEG)")
        if len(images) > max(1, p["batch_size"]):
            _refuse(
                "init_images",
                f"got {len(images)} images for a batch_size of {p['batch_size']}; send at most batch_size images "
                "(one image is used for the whole batch), as A1111",
            )
        init = [decode_image(im, f"init_images[{i}]", max_pixels, budget) for i, im in enumerate(images)]
    else:
        init = None
        first = (p["firstphase_width"], p["firstphase_height"])
        if any(first):  # A1111 (__post_init__): the image is made at this size; hr_scale/hr_resize go on from it
            if not all(first):
                _refuse("firstphase_width", "give both firstphase_width and firstphase_height, or neither")
            data.update(width=first[0], height=first[1])
        if p["enable_hr"]:
            data.update(
                enable_hr=True,
                hr_scale=p["hr_scale"],
                hr_upscaler=p["hr_upscaler"] or None,  # A1111: "Latent", and no "Hires upscaler" in the infotext
                hr_second_pass_steps=p["hr_second_pass_steps"],
                hr_resize_x=p["hr_resize_x"],
                hr_resize_y=p["hr_resize_y"],
                hr_prompt=p["hr_prompt"] or "",
                hr_negative_prompt=p["hr_negative_prompt"] or "",
                hr_sampler_name=p["hr_sampler_name"] or "",
                hr_scheduler=p["hr_scheduler"] or "",
                hr_checkpoint_name=p["hr_checkpoint_name"] or "",  # a catalog name (jobs.make_spec)
                denoising_strength=0.7 if p["denoising_strength"] is None else p["denoising_strength"],
            )
    ours = {f.name for f in dataclasses.fields(GenerationRequest)}
    # fields of other tools are kept in `extra`; only our plain settings pass by name, never an option
    # group (those hold images and paths: the API fills them from A1111's fields above)
    passed = {k: v for k, v in extra.items() if k in _PLAIN_FIELDS and k in ours}
    kept = {k: v for k, v in extra.items() if k not in _HANDLED and k not in passed}
    try:
        req = GenerationRequest.from_dict({**data, **passed, "extra": kept}, lenient=True)
        req.validate(img2img=img2img, upscaler_files=upscaler_files)
    except RequestError as e:
        raise _a1111_field(str(e)) from None
    except (TypeError, ValueError) as e:
        raise RequestError(f"the request does not fit: {e}") from None
    where = non_finite(p)  # after validate, whose messages say more for the fields it knows
    if where is not None:
        _refuse(where, "NaN and Infinity are not numbers a request can take; send a finite number")
    if max_output_pixels:
        _check_output_size(req, img2img, max_output_pixels)
    return req, init, model, vae


def server_request(payload: _Payload, *, img2img: bool, options: dict, config) -> tuple:
    """``to_request`` with the limits of a server's ``ServerConfig``: every generating endpoint calls this."""
    return to_request(
        payload,
        img2img=img2img,
        options=options,
        max_pixels=config.max_image_pixels,
        upscaler_files=bool(config.upscaler_dirs),
        controlnets=config.controlnets(),
        max_output_pixels=config.max_output_pixels,
        vaes=config.vaes(),
        styles=config.styles,
    )


def _check_output_size(req: GenerationRequest, img2img: bool, limit: int) -> None:
    """Refuse a pass whose images (after hires) hold more than ``limit`` pixels together: the server's
    bound on the memory and time one job takes (--max-output-pixels)."""
    from latentforge.pipelines.hires import target_pixels, target_size

    w, h = req.width, req.height
    field = "width"
    if req.hires is not None and not img2img:
        target_size(req, w, h)  # its own limits first
        w, h = target_pixels(req, w, h)  # the upscaled image, before any crop
        field = "hr_scale"
    total = w * h * req.batch_size
    if total > limit:
        raise FieldError(
            field,
            f"{w}x{h} x batch_size {req.batch_size} is {total} pixels in one pass; this server takes at most "
            f"{limit} (--max-output-pixels): lower width/height, hr_scale or batch_size",
        )


def _check_numbers(p: dict, img2img: bool) -> None:
    """Numbers are checked even where the request does not use them. Without enable_hr, the hr_* fields and
    denoising_strength of txt2img get the hires pass's checks (A1111's pydantic refuses wrong types whatever
    enable_hr says). NaN and Infinity (json.loads reads them) are refused in every field by ``to_request``,
    other tools' too: the response echoes the request, where they became null, and the jobs event stream
    sent them as ``NaN``, which is not JSON (browsers' JSON.parse fails)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise _a1111_field(f"{message} (checked although enable_hr is false)")

    if not img2img and not p["enable_hr"]:
        from latentforge.pipelines.checks import validate_hires
        from latentforge.pipelines.request import HiresOptions

        steps, x, y = p["hr_second_pass_steps"], p["hr_resize_x"], p["hr_resize_y"]
        validate_hires(HiresOptions(p["hr_scale"], "Latent", steps, x, y), need)
        ds = p["denoising_strength"]
        need(ds is None or 0 <= ds <= 1, f"denoising_strength must be between 0 and 1, got {ds!r}")


_PATHLIKE = re.compile(r"[/\\]|^\.|\.(pth|pt|safetensors|ckpt|bin)$", re.IGNORECASE)


def _check_names(p: dict) -> None:
    """Upscalers and prompt networks (``<lora:name>``, ``<hypernet:name>``) by name only: the library
    reads a path there, but a client of the server never chooses a file on the server."""
    from latentforge.conditioning.prompt import extract_network_tags

    upscaler = p.get("hr_upscaler")
    if p.get("enable_hr") and isinstance(upscaler, str) and _PATHLIKE.search(upscaler.strip()):
        _refuse("hr_upscaler", f"{upscaler[:80]!r} is a path; give an upscaler name as /sdapi/v1/upscalers lists")
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        text = p.get(name)
        if not isinstance(text, str) or "<" not in text:
            continue
        for kind, items in extract_network_tags(text)[1]:
            if items and _PATHLIKE.search(items[0].strip()):
                _refuse(name, f"<{kind}:{items[0][:80]}>: networks are given by name, not by path")
    task = p.get("force_task_id")
    if task and (len(task) > 128 or not task.isprintable() or _NOT_IN_A_PATH.search(task)):
        _refuse(
            "force_task_id",
            "must be at most 128 printable characters without spaces or / \\ ? # % (it names the job in URLs)",
        )


_NOT_IN_A_PATH = re.compile(r"[\s/\\?#%]")  # characters a job id cannot have in /latentforge/v1/jobs/{id}

# latentforge's own request fields a client may set by name (numbers, flags, names: no paths, no images)
_PLAIN_FIELDS = {
    "sgm_noise_multiplier",
    "quantize_timesteps",
    "prompt_syntax",
    "aesthetic_score",
    "negative_aesthetic_score",
    "s_min_uncond_all",
    "token_merging_ratio",
    "token_merging_ratio_hr",
    "token_merging_ratio_img2img",
    "token_merging_random",
    "token_merging_max_downsample",
    "deepcache_interval",
    "deepcache_depth",
    "deepcache_schedule",
}
# A1111 settings (POST /sdapi/v1/options, or per request in override_settings) -> request fields here
_SETTING_FIELDS = {
    "token_merging_ratio": "token_merging_ratio",
    "token_merging_ratio_hr": "token_merging_ratio_hr",
    "token_merging_ratio_img2img": "token_merging_ratio_img2img",
    "eta_noise_seed_delta": "eta_noise_seed_delta",  # ENSD
    "randn_source": "rng",  # "Random number generator source": GPU, CPU or NV
    "sgm_noise_multiplier": "sgm_noise_multiplier",
    "s_min_uncond_all": "s_min_uncond_all",
    "initial_noise_multiplier": "initial_noise_multiplier",  # img2img's "Noise multiplier"
    "inpainting_mask_weight": "inpainting_mask_weight",  # inpainting models' "Conditional mask weight"
    "sdxl_refiner_high_aesthetic_score": "aesthetic_score",  # the SDXL refiner's conditioning
    "sdxl_refiner_low_aesthetic_score": "negative_aesthetic_score",
}


def check_settings(values: dict) -> None:
    """The A1111 settings among ``values`` that change images (``_SETTING_FIELDS``), checked as a request
    checks them, so that ``POST /sdapi/v1/options`` refuses a value every later request would fail on (the
    sampler settings too: ``sdapi_settings.SAMPLER_SETTINGS``)."""
    check_sampler_settings(values)
    unsupported_settings(values)  # the settings latentforge cannot run: refused here already
    fields = {ours: values[theirs] for theirs, ours in _SETTING_FIELDS.items() if theirs in values}
    if not fields:
        return
    try:
        GenerationRequest.from_dict({"prompt": "", **fields}).validate()
    except (RequestError, TypeError, ValueError) as e:
        theirs = {ours: theirs for theirs, ours in _SETTING_FIELDS.items()}
        first = str(e).split(" ", 1)[0].rstrip(":")
        raise FieldError(theirs.get(first, "options"), str(e)) from None


# our field names -> A1111's, for messages of GenerationRequest.validate
_A1111_NAMES = {
    "batch_count": "n_iter",
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "rng": "override_settings.randn_source",
    "eta_noise_seed_delta": "override_settings.eta_noise_seed_delta",
    "sgm_noise_multiplier": "override_settings.sgm_noise_multiplier",
    "hr_scale": "hr_scale",
    "hr_second_pass_steps": "hr_second_pass_steps",
    "hr_resize_x": "hr_resize_x",
    "hr_resize_y": "hr_resize_y",
    "hr_prompt": "hr_prompt",
    "hr_negative_prompt": "hr_negative_prompt",
    "hr_sampler_name": "hr_sampler_name",
    "hr_scheduler": "hr_scheduler",
    "initial_noise_multiplier": "initial_noise_multiplier",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "seed": "seed",
    "batch_size": "batch_size",
    "cfg_scale": "cfg_scale",
    "denoising_strength": "denoising_strength",
    "resize_mode": "resize_mode",
    "inpainting_fill": "inpainting_fill",
    "inpaint_full_res_padding": "inpaint_full_res_padding",
}


def _a1111_field(message: str) -> RequestError:
    """A validation message as a FieldError under the A1111 name of the field it starts with."""
    first = message.split(" ", 1)[0].rstrip(":")
    if message.startswith("unknown sampler"):
        first = "sampler"
    elif message.startswith("unknown schedule"):
        first = "schedule"
    if first in _A1111_NAMES:
        theirs = _A1111_NAMES[first]
        error = RequestError(message if theirs == first else f"{theirs} ({first}): {message}")
        error.field = theirs
        return error
    return RequestError(message)


def _check_unsupported(p: dict) -> None:
    if p.get("restore_faces"):
        _refuse("restore_faces", "face restoration is not available in latentforge; send false")
    if p.get("script_name"):
        _refuse("script_name", f"scripts are not available in latentforge (got {p['script_name']!r})")
    for name, script in (p.get("alwayson_scripts") or {}).items():
        if name.lower() == "controlnet":
            continue  # read by control_units
        args = script.get("args") if isinstance(script, dict) else script
        if not isinstance(args, (list, tuple)):  # {"args": 5}, 5, "text": something meant to run
            args = [] if args in (None, "", {}) else [args]
        enabled = [a for a in args if not (isinstance(a, dict) and a.get("enabled") is False)]
        if enabled:
            _refuse(f"alwayson_scripts.{name}", f"the always-on script {name!r} cannot run in latentforge")
    for name in ("latent_mask", "firstpass_image"):  # (not payload fields: read from the extra ones)
        if p.get(name):
            _refuse(name, "is not available in latentforge; leave it out")
