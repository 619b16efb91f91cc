"""Generation parameters written into and read back from PNG files: A1111 infotext and our JSON."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

from latentforge.conditioning.prompt import extract_network_tags
from latentforge.io.infotext import parse_infotext
from latentforge.pipelines.checks import is_int, show
from latentforge.pipelines.infotext_fields import _mode, _model_fields, _without_hash, infotexts_for
from latentforge.pipelines.request import (
    INPAINT_FILL,
    GenerationRequest,
    HiresOptions,
    InpaintOptions,
    RefinerOptions,
    RequestError,
    X4Options,
)
from latentforge.sampling.registry import SAMPLERS, resolve


def request_json(pipe, req: GenerationRequest, image: int, mode: str | bool) -> str:
    """Our exact record of image ``image`` of the run ``req``: the request of the pass that made it (its
    first seed and subseed, its batch size) and the image's index in that pass, so the same pixels can be
    made again. Adapters applied to the pipeline for good (``Pipeline.apply_lora``) are in its networks, by
    path, before the request's own: a fresh pipeline applies them for that request."""
    index = image % req.batch_size
    start = image - index  # the pass's first image
    seed, subseed = (req.seed, req.subseed + start) if req.subseed_strength else (req.seed + start, req.subseed)
    applied = [ref for ref, _ in pipe.applied_networks()] if hasattr(pipe, "applied_networks") else []
    request = {**req.to_dict(), "seed": seed, "subseed": subseed, "batch_count": 1}
    request["networks"] = [*(_plain_ref(r) for r in applied), *request["networks"]]
    data = {
        "latentforge": 1,
        "mode": _mode(mode),
        "batch_index": index,
        "request": request,
        "model": {
            "family": pipe.family.name,
            "prediction": pipe.prediction,
            "source": pipe.info.source if pipe.info else None,
            "hash": _model_fields(pipe)["Model hash"],
        },
    }
    return json.dumps(data, default=_jsonable)


def _plain_ref(ref) -> dict:
    return {"name": ref.name, "kind": ref.kind, "strength": ref.strength, "text_strength": ref.text_strength}


def _jsonable(x):
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return str(x)


def read_png_metadata(path: str | Path) -> dict:
    """{"parameters": infotext or None, "latentforge": parsed JSON or None, "comfy": ComfyUI's prompt
    graph or None} of an image file: PNG text chunks, or a JPEG/WebP's EXIF UserComment (A1111). Only
    the header and metadata are read (no pixels); PIL's limits bound the text. A file that is not an
    image, or whose ``latentforge`` text is not JSON, is a RequestError naming the file."""
    from PIL import Image

    from latentforge.io.images import read_user_comment

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixels are decoded here
            with Image.open(path) as im:
                text = dict(im.info)
                if not text.get("parameters"):
                    text["parameters"] = read_user_comment(im)
    except Exception as e:  # any failure of a decoder on a hostile file means "cannot read"
        raise RequestError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    parameters = text.get("parameters")
    if parameters is not None and not isinstance(parameters, str):
        raise RequestError(f"{path}: its 'parameters' text is not text ({type(parameters).__name__})")

    def parse(key: str):
        value = text.get(key)
        if not isinstance(value, str):
            return None
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return None

    ours = parse("latentforge")
    if ours is None and text.get("latentforge"):
        raise RequestError(
            f"{path}: its 'latentforge' record is not valid JSON (the file is damaged or was edited); use another image"
        )
    comfy = parse("prompt")
    return {
        "parameters": parameters or None,
        "latentforge": ours,
        "comfy": comfy if isinstance(comfy, dict) else None,
    }


def request_from_image(path: str | Path) -> tuple[GenerationRequest, dict]:
    """The request that made an image: exact from our JSON if present, else from the A1111 infotext
    (PNG text or JPEG/WebP EXIF), else from a ComfyUI graph. Returns (request, {"mode", "model",
    "source", "batch_index"}). The whole record is checked first (types, known mode, batch_index
    within the batch): a RequestError names the file and the field."""
    meta = read_png_metadata(path)
    if meta["latentforge"] is not None:
        try:
            return _from_record(meta["latentforge"])
        except RequestError as e:
            raise RequestError(f"{path}: latentforge record: {e}") from None
    if meta["parameters"]:
        try:
            return request_from_infotext(meta["parameters"])
        except RequestError as e:
            raise RequestError(f"{path}: parameters: {e}") from None
    if meta["comfy"]:
        from latentforge.pipelines.comfy import request_from_comfy

        try:
            return request_from_comfy(meta["comfy"])
        except RequestError as e:
            raise RequestError(f"{path}: ComfyUI graph: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise RequestError(f"{path}: its ComfyUI graph cannot be read ({type(e).__name__}: {e})") from None
    raise RequestError(
        f"{path} carries no generation parameters (no A1111 'parameters', latentforge or ComfyUI 'prompt' data)"
    )


def _from_record(record) -> tuple[GenerationRequest, dict]:
    if not isinstance(record, dict):
        raise RequestError(f"must be a JSON object, got {show(record)}")
    if record.get("latentforge") != 1:
        raise RequestError(
            f"version {show(record.get('latentforge'))} is not 1 (written by another version of latentforge?)"
        )
    if record.get("mode") not in ("txt2img", "img2img", "upscale-x4"):
        raise RequestError(f"mode must be 'txt2img', 'img2img' or 'upscale-x4', got {show(record.get('mode'))}")
    if not isinstance(record.get("request"), dict):
        raise RequestError(f"request must be a JSON object, got {show(record.get('request'))}")
    model = record.get("model", {})
    if not isinstance(model, dict):
        raise RequestError(f"model must be a JSON object, got {show(model)}")
    for key in ("name", "hash"):  # compared and shown after the model loads: checked now
        if model.get(key) is not None and not isinstance(model[key], str):
            raise RequestError(f"model.{key} must be text or null, got {show(model[key])}")
    data = dict(record["request"])
    if data.get("s_tmax") == "inf":
        data["s_tmax"] = float("inf")
    req = GenerationRequest.from_dict(data)
    index = record.get("batch_index", 0)
    if not (is_int(index) and is_int(req.batch_size) and 0 <= index < req.batch_size):
        raise RequestError(
            f"batch_index must be a whole number from 0 to batch_size - 1 ({show(req.batch_size)}), got {show(index)}"
        )
    return req, {"mode": record["mode"], "model": model, "source": "json", "batch_index": index}


def _value(settings: dict, key: str, convert, what: str):
    """An infotext value converted, or a RequestError naming the field."""
    try:
        return convert(settings[key])
    except (ValueError, OverflowError, TypeError):
        raise RequestError(f"{key} {show(settings[key])} is not {what}") from None


def _four_ints(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 4:
        raise ValueError(text)
    return values


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", text, re.I)
    if not m:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


# A1111's infotext fields that are one number of the request: (field, request attribute, type)
_SCALAR_FIELDS = (
    ("Steps", "steps", int),
    ("CFG scale", "cfg_scale", float),
    ("CFG rescale", "guidance_rescale", float),
    ("CFG Rescale φ", "guidance_rescale", float),
    ("RescaleCFG", "guidance_rescale", float),
    ("Seed", "seed", int),
    ("Denoising strength", "denoising_strength", float),
    ("Noise multiplier", "initial_noise_multiplier", float),
    ("Clip skip", "clip_skip", int),
    ("Eta", "eta", float),
    ("Eta DDIM", "eta", float),
    ("Sigma churn", "s_churn", float),
    ("Sigma tmin", "s_tmin", float),
    ("Sigma tmax", "s_tmax", float),
    ("Sigma noise", "s_noise", float),
    ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float),
    ("ENSD", "eta_noise_seed_delta", int),
    ("NGMS", "s_min_uncond", float),
    ("Token merging ratio", "token_merging_ratio", float),
    ("Token merging ratio hr", "token_merging_ratio_hr", float),
    ("Token merging max downsample", "token_merging_max_downsample", int),
    ("DeepCache interval", "deepcache_interval", int),
    ("DeepCache depth", "deepcache_depth", int),
)


# the hires pass's own settings: infotext label -> HiresOptions field
_HIRES_OWN = {
    "Hires prompt": "prompt",
    "Hires negative prompt": "negative_prompt",
    "Hires sampler": "sampler",
    "Hires schedule type": "schedule",
}


def request_from_infotext(text: str) -> tuple[GenerationRequest, dict]:
    """A request from A1111's infotext; a value that does not convert is a RequestError naming its field
    (ranges are checked by ``GenerationRequest.validate``)."""
    prompt, negative, s = parse_infotext(text)
    req = GenerationRequest(prompt=prompt, negative_prompt=negative)
    size = "a size WIDTHxHEIGHT"
    for key, attr, kind in _SCALAR_FIELDS:
        if key in s:
            setattr(req, attr, _value(s, key, kind, "a whole number" if kind is int else "a number"))
    for key, attrs in (
        ("Size", ("width", "height")),
        ("Seed resize from", ("seed_resize_from_w", "seed_resize_from_h")),
    ):
        if key in s:
            w, h = _value(s, key, _size, size)
            setattr(req, attrs[0], w)
            setattr(req, attrs[1], h)
    if "Sampler" in s:
        sampler_title = s["Sampler"]
        try:
            info, from_name = resolve(sampler_title)
            req.sampler = info.title
            if from_name:
                req.schedule = from_name
        except ValueError:
            req.sampler = sampler_title
    if "Schedule type" in s:
        req.schedule = s["Schedule type"]
    req.s_min_uncond_all = str(s.get("NGMS all steps", "")).lower() == "true"
    req.sgm_noise_multiplier = str(s.get("SGM noise multiplier", "")).lower() == "true"
    req.tiling = str(s.get("Tiling", "")).lower() == "true"
    req.token_merging_random = str(s.get("Token merging random", "")).lower() == "true"
    req.deepcache_schedule = s.get("DeepCache schedule", req.deepcache_schedule)
    # A1111 writes no RNG field for its default source, the GPU's
    req.rng = s.get("RNG", "GPU")
    hires = {"Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires checkpoint", *_HIRES_OWN}
    if hires & set(s):
        h = req.hires = HiresOptions()
        if "Hires upscale" in s:
            h.scale = _value(s, "Hires upscale", float, "a number")
        if "Hires resize" in s:
            h.resize_x, h.resize_y = _value(s, "Hires resize", _size, size)
        if "Hires steps" in s:
            h.second_pass_steps = _value(s, "Hires steps", int, "a whole number")
        h.upscaler = s.get("Hires upscaler", h.upscaler)
        for label, attr in _HIRES_OWN.items():
            setattr(h, attr, s.get(label, getattr(h, attr)))
        if "Hires checkpoint" in s:  # a name: the CLI and the server find the file
            h.checkpoint = _without_hash(s["Hires checkpoint"])
    if "Refiner" in s:
        req.refiner = RefinerOptions(checkpoint=_without_hash(s["Refiner"]))
        if "Refiner switch at" in s:
            req.refiner.switch_at = _value(s, "Refiner switch at", float, "a number")
        req.refiner.switch_by_steps = str(s.get("Refiner switch by sampling steps", "")).lower() == "true"
    if "X4 noise level" in s:
        tile = _value(s, "X4 tile", int, "a whole number") if "X4 tile" in s else None
        req.x4 = X4Options(noise_level=_value(s, "X4 noise level", int, "a whole number"), tile=tile)
    inpaint_fields = _inpaint_from_infotext(req, s)
    known = {key for key, _, _ in _SCALAR_FIELDS} | {"Size", "Seed resize from", "Sampler", "Schedule type"}
    known |= {"RNG", "NGMS all steps", "SGM noise multiplier", "Token merging random", "DeepCache schedule", "Tiling"}
    known |= hires | inpaint_fields
    known |= {"Refiner", "Refiner switch at", "Refiner switch by sampling steps", "X4 noise level", "X4 tile"}
    req.extra = {k: v for k, v in s.items() if k not in known}
    mode = "upscale-x4" if req.x4 else "img2img" if "Denoising strength" in s and not req.hires else "txt2img"
    model = {"name": s.get("Model"), "hash": s.get("Model hash")}
    return req, {"mode": mode, "model": model, "source": "infotext", "batch_index": 0}


# infotext fields that do not change the pixels latentforge makes (the rest are read into the request,
# or named by unreproduced_fields)
INFORMATIONAL = {"Model hash", "Model", "VAE hash", "VAE", "Version", "TI hashes", "Hashes", "RNG"}
INFORMATIONAL |= {"Lora hashes", "Hypernet hashes"}  # (unless no prompt tag names one: unreproduced_fields)
HARMLESS_VALUES = {"Emphasis": "Original", "Schedule type": "Automatic", "Pad conds": "False"}


def unreproduced_fields(req: GenerationRequest) -> list[str]:
    """The settings of an image (kept in ``req.extra`` when its infotext was read) that latentforge
    cannot reproduce and that may change the image: named so that ``--from`` refuses or warns. Lora and
    Hypernet hashes of networks that no prompt tag names (applied to the model, not by the prompt: the
    infotext cannot say how strongly) count too."""
    missing = [k for k, v in req.extra.items() if k not in INFORMATIONAL and HARMLESS_VALUES.get(k) != str(v)]
    tags = extract_network_tags(req.prompt)[1] if isinstance(req.prompt, str) else []
    for label, kinds in (("Lora hashes", ("lora", "lyco")), ("Hypernet hashes", ("hypernet", "hypernetwork"))):
        named = Counter(re.sub("[:,]", "", items[0]).strip() for kind, items in tags if kind in kinds and items)
        listed = Counter(e.rsplit(":", 1)[0].strip() for e in str(req.extra.get(label, "")).strip('"').split(",") if e)
        if any(name and count > named[name] for name, count in listed.items()):  # (applied, or twice)
            missing.append(label)
    return sorted(missing)


def model_differences(pipe, meta: dict) -> list[str]:
    """How the loaded model differs from the one an image names (hash, else name), as sentences."""
    fields = _model_fields(pipe)
    want = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    # from a file: a name or hash that is not text counts as absent
    want_hash, want_name = (v if isinstance(v, str) else None for v in (want.get("hash"), want.get("name")))
    have_hash = fields.get("Model hash")
    if want_hash and have_hash and want_hash.lower() != have_hash.lower():
        return [f"the image was made with model {want_name or '?'} [{want_hash}], not the loaded "
                f"{fields.get('Model')} [{have_hash}]"]  # fmt: skip
    return []


INPAINT_FIELDS = {
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    "Mask mode",
    "Conditional mask weight",
    "Outpaint",
    "Mask rounding",
}


def _inpaint_from_infotext(req: GenerationRequest, s: dict) -> set[str]:
    """A1111's inpainting fields (and latentforge's "Outpaint: left,top,right,bottom") -> req.inpaint;
    the mask itself is not in the text ("Mask blur" is left out where A1111's x and y blurs differ: read
    as 0). "Conditional mask weight" (any run of an inpainting model: a general field) alone makes no
    inpainting request. Returns the field names it read."""
    found = INPAINT_FIELDS & set(s)
    if "Conditional mask weight" in s:
        req.inpainting_mask_weight = _value(s, "Conditional mask weight", float, "a number")
    if not found - {"Conditional mask weight"}:  # A1111 writes it for every run of an inpainting model
        return found
    o = req.inpaint = InpaintOptions(mask_blur=0)
    if "Mask blur" in s:
        blur = _value(s, "Mask blur", lambda v: [float(x) for x in v.lower().split("x", 1)], "a number or XxY")
        o.mask_blur = blur[0]
        if len(blur) == 2:
            o.mask_blur_x, o.mask_blur_y = blur
    o.inpaint_full_res = s.get("Inpaint area") == "Only masked"
    if "Masked area padding" in s:
        o.inpaint_full_res_padding = _value(s, "Masked area padding", int, "a whole number")
    if "Masked content" in s:
        names = {v: k for k, v in INPAINT_FILL.items()}
        o.inpainting_fill = names.get(s["Masked content"], 1)
    o.inpainting_mask_invert = s.get("Mask mode") == "Inpaint not masked"
    o.mask_round = str(s.get("Mask rounding", "True")).lower() != "false"
    if "Outpaint" in s:
        o.outpaint_left, o.outpaint_top, o.outpaint_right, o.outpaint_bottom = _value(
            s, "Outpaint", _four_ints, "four whole numbers left,top,right,bottom"
        )
    return found


__all__ = ["SAMPLERS", "infotexts_for", "read_png_metadata", "request_from_image", "request_from_infotext"]
