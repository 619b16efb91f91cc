"""Generation parameters written into and read back from PNG files: A1111 infotext and our JSON."""

from __future__ import annotations

import json
from pathlib import Path

from latentforge.io.hashing import model_hash
from latentforge.io.infotext import format_infotext, parse_infotext
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


def infotext_params(
    pipe,
    req: GenerationRequest,
    seed: int,
    info,
    schedule: str,
    mode: str | bool,
    refiner: dict | None = None,
    extra: dict | None = None,
) -> dict:
    from latentforge._version import __version__

    img2img = _mode(mode) == "img2img"

    params = {
        "Steps": req.steps,
        "Sampler": info.title,
        "Schedule type": SCHEDULE_TITLES[schedule],
        "CFG scale": _num(req.cfg_scale),
        "CFG rescale": _num(req.guidance_rescale) if req.guidance_rescale else None,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        **_model_fields(pipe),
        "Variation seed": req.subseed + (seed - req.seed) if req.subseed_strength else None,
        "Variation seed strength": _num(req.subseed_strength) if req.subseed_strength else None,
        "Seed resize from": _resize_from(req),
        "Denoising strength": _num(req.denoising_strength) if img2img or req.hires else None,
        **(_hires_fields(req.hires) if req.hires and not img2img else {}),
        **(refiner if refiner is not None else _refiner_fields(req.refiner) if req.refiner else {}),
        **(_x4_fields(req.x4) if req.x4 else {}),
        **(extra or {}),
        "Clip skip": req.clip_skip if req.clip_skip and req.clip_skip > 1 else None,
        "Eta": _num(req.eta) if req.eta is not None else None,
        "ENSD": req.eta_noise_seed_delta or None,
        "NGMS": _num(req.s_min_uncond) if req.s_min_uncond else None,
        "NGMS all steps": True if req.s_min_uncond and req.s_min_uncond_all else None,
        "RNG": req.rng,
        "Version": f"latentforge {__version__}",
    }
    return params


def _resize_from(req: GenerationRequest) -> str | None:
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        return f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
    return None


def _hires_fields(h: HiresOptions) -> dict:
    """A1111's names for the hires fix settings."""
    resize = h.resize_x or h.resize_y
    return {
        "Hires upscale": None if resize else _num(h.scale),
        "Hires resize": f"{h.resize_x}x{h.resize_y}" if resize else None,
        "Hires steps": h.second_pass_steps or None,
        "Hires upscaler": h.upscaler,
    }


def _refiner_fields(r: RefinerOptions) -> dict:
    """A1111's fields: "Refiner: name [hash]" (its short title), "Refiner switch at", and "Refiner switch by
    sampling steps: True" when that rule was used."""
    path = Path(str(r.checkpoint))
    name = path.stem if path.is_file() else path.name
    digest = model_hash(path) if path.is_file() else None
    return {
        "Refiner": f"{name} [{digest}]" if digest else name,
        "Refiner switch at": _num(r.switch_at),
        "Refiner switch by sampling steps": True if r.switch_by_steps else None,
    }


def _x4_fields(x: X4Options) -> dict:
    return {"X4 noise level": x.noise_level, "X4 tile": x.tile}


def _num(x: float) -> str:
    return f"{x:g}"


def infotexts_for(
    pipe, req: GenerationRequest, seeds: list[int], info, schedule: str, mode: str | bool, extra: dict | None = None
) -> list[str]:
    """A1111's infotext of each image; ``extra`` holds the fields the tasks add (Mask blur, ...)."""
    refiner = _refiner_fields(req.refiner) if req.refiner else None  # hashed once for the batch
    return [
        format_infotext(
            req.prompt, req.negative_prompt, infotext_params(pipe, req, s, info, schedule, mode, refiner, extra)
        )
        for s in seeds
    ]


def request_json(pipe, req: GenerationRequest, seed: int, mode: str | bool) -> str:
    """Our exact record of one image: the request of the pass that made it (its first seed, its batch
    size) and the image's index in that pass, so the same pixels can be made again."""
    index = (seed - req.seed) % req.batch_size
    data = {
        "latentforge": 1,
        "mode": _mode(mode),
        "batch_index": index,
        "request": {**req.to_dict(), "seed": seed - index, "batch_count": 1},
        "model": {
            "family": pipe.family.name,
            "prediction": pipe.prediction,
            "source": pipe.info.source if pipe.info else None,
            "hash": _model_fields(pipe)["Model hash"],
        },
    }
    return json.dumps(data, default=_jsonable)


def _jsonable(x):
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return str(x)


def read_png_metadata(path: str | Path) -> dict:
    """{"parameters": infotext or None, "latentforge": parsed JSON or None, "comfy": ComfyUI's prompt
    graph or None} of an image file: PNG text chunks, or a JPEG/WebP's EXIF UserComment (A1111)."""
    from PIL import Image

    from latentforge.io.images import read_user_comment

    try:
        with Image.open(path) as im:
            text = dict(im.info)
            if not text.get("parameters"):
                text["parameters"] = read_user_comment(im)
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read image {path}: {e}") from None

    def parse(key: str):
        value = text.get(key)
        if not isinstance(value, str):
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None

    comfy = parse("prompt")
    return {
        "parameters": text.get("parameters"),
        "latentforge": parse("latentforge"),
        "comfy": comfy if isinstance(comfy, dict) else None,
    }


def request_from_image(path: str | Path) -> tuple[GenerationRequest, dict]:
    """The request that made an image: exact from our JSON if present, else from the A1111 infotext
    (PNG text or JPEG/WebP EXIF), else from a ComfyUI graph. Returns (request, {"mode", "model",
    "source", "batch_index"})."""
    meta = read_png_metadata(path)
    if meta["latentforge"]:
        data = dict(meta["latentforge"]["request"])
        if data.get("s_tmax") == "inf":
            data["s_tmax"] = float("inf")
        record = meta["latentforge"]
        info = {
            "mode": record["mode"],
            "model": record.get("model", {}),
            "source": "json",
            "batch_index": record.get("batch_index", 0),
        }
        return GenerationRequest.from_dict(data), info
    if meta["parameters"]:
        return request_from_infotext(meta["parameters"])
    if meta["comfy"]:
        from latentforge.pipelines.comfy import request_from_comfy

        return request_from_comfy(meta["comfy"])
    raise RequestError(
        f"{path} carries no generation parameters (no A1111 'parameters', latentforge or ComfyUI 'prompt' data)"
    )


def request_from_infotext(text: str) -> tuple[GenerationRequest, dict]:
    prompt, negative, s = parse_infotext(text)
    req = GenerationRequest(prompt=prompt, negative_prompt=negative)
    if "Steps" in s:
        req.steps = int(s["Steps"])
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
    if "CFG scale" in s:
        req.cfg_scale = float(s["CFG scale"])
    rescale_keys = ("CFG rescale", "CFG Rescale φ", "RescaleCFG")
    for key in rescale_keys:
        if key in s:
            req.guidance_rescale = float(s[key])
    if "Seed" in s:
        req.seed = int(s["Seed"])
    if "Size" in s:
        w, h = s["Size"].lower().split("x")
        req.width, req.height = int(w), int(h)
    if "Denoising strength" in s:
        req.denoising_strength = float(s["Denoising strength"])
    if "Clip skip" in s:
        req.clip_skip = int(s["Clip skip"])
    if "Eta" in s:
        req.eta = float(s["Eta"])
    if "Variation seed" in s:
        req.subseed = int(s["Variation seed"])
        req.subseed_strength = float(s.get("Variation seed strength", 0))
    if "Seed resize from" in s:
        w, h = s["Seed resize from"].lower().split("x")
        req.seed_resize_from_w, req.seed_resize_from_h = int(w), int(h)
    if "ENSD" in s:
        req.eta_noise_seed_delta = int(s["ENSD"])
    if "NGMS" in s:
        req.s_min_uncond = float(s["NGMS"])
        req.s_min_uncond_all = str(s.get("NGMS all steps", "")).lower() == "true"
    # A1111 writes no RNG field for its default source, the GPU's
    req.rng = s.get("RNG", "GPU")
    hires = {"Hires upscale", "Hires resize", "Hires steps", "Hires upscaler"}
    if hires & set(s):
        h = req.hires = HiresOptions()
        h.scale = float(s.get("Hires upscale", h.scale))
        if "Hires resize" in s:
            x, y = s["Hires resize"].lower().split("x")
            h.resize_x, h.resize_y = int(x), int(y)
        h.second_pass_steps = int(s.get("Hires steps", 0))
        h.upscaler = s.get("Hires upscaler", h.upscaler)
    if "Refiner" in s:
        name = s["Refiner"].rsplit(" [", 1)[0] if s["Refiner"].endswith("]") else s["Refiner"]
        req.refiner = RefinerOptions(checkpoint=name)
        req.refiner.switch_at = float(s.get("Refiner switch at", req.refiner.switch_at))
        req.refiner.switch_by_steps = str(s.get("Refiner switch by sampling steps", "")).lower() == "true"
    if "X4 noise level" in s:
        tile = s.get("X4 tile")
        req.x4 = X4Options(noise_level=int(s["X4 noise level"]), tile=int(tile) if tile is not None else None)
    inpaint_fields = _inpaint_from_infotext(req, s)
    known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip", "Eta"}
    known |= {"Variation seed", "Variation seed strength", "Seed resize from", "ENSD", "RNG", *rescale_keys}
    known |= {"NGMS", "NGMS all steps"}
    known |= hires | inpaint_fields
    known |= {"Refiner", "Refiner switch at", "Refiner switch by sampling steps", "X4 noise level", "X4 tile"}
    req.extra = {k: v for k, v in s.items() if k not in known}
    mode = "upscale-x4" if req.x4 else "img2img" if "Denoising strength" in s and not req.hires else "txt2img"
    model = {"name": s.get("Model"), "hash": s.get("Model hash")}
    return req, {"mode": mode, "model": model, "source": "infotext", "batch_index": 0}


# infotext fields that do not change the pixels latentforge makes (the rest are read into the request,
# or named by unreproduced_fields)
INFORMATIONAL = {"Model hash", "Model", "VAE hash", "VAE", "Version", "Lora hashes", "TI hashes", "Hashes", "RNG"}
HARMLESS_VALUES = {"Emphasis": "Original", "Schedule type": "Automatic", "Pad conds": "False"}


def unreproduced_fields(req: GenerationRequest) -> list[str]:
    """The settings of an image (kept in ``req.extra`` when its infotext was read) that latentforge
    cannot reproduce and that may change the image: named so that ``--from`` refuses or warns."""
    return sorted(k for k, v in req.extra.items() if k not in INFORMATIONAL and HARMLESS_VALUES.get(k) != str(v))


def model_differences(pipe, meta: dict) -> list[str]:
    """How the loaded model differs from the one an image names (hash, else name), as sentences."""
    fields = _model_fields(pipe)
    want = meta.get("model") or {}
    have_hash, want_hash = fields.get("Model hash"), want.get("hash")
    if want_hash and have_hash and want_hash.lower() != have_hash.lower():
        return [f"the image was made with model {want.get('name') or '?'} [{want_hash}], not the loaded "
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
}


def _inpaint_from_infotext(req: GenerationRequest, s: dict) -> set[str]:
    """A1111's inpainting fields (and latentforge's "Outpaint: left,top,right,bottom") -> req.inpaint;
    the mask itself is not in the text. Returns the field names it read."""
    found = INPAINT_FIELDS & set(s)
    if not found:
        return found
    o = req.inpaint = InpaintOptions(mask_blur=0)
    if "Mask blur" in s:
        blur = s["Mask blur"].lower().split("x")
        o.mask_blur = float(blur[0])
        if len(blur) == 2:
            o.mask_blur_x, o.mask_blur_y = float(blur[0]), float(blur[1])
    o.inpaint_full_res = s.get("Inpaint area") == "Only masked"
    if "Masked area padding" in s:
        o.inpaint_full_res_padding = int(s["Masked area padding"])
    if "Masked content" in s:
        names = {v: k for k, v in INPAINT_FILL.items()}
        o.inpainting_fill = names.get(s["Masked content"], 1)
    o.inpainting_mask_invert = s.get("Mask mode") == "Inpaint not masked"
    if "Conditional mask weight" in s:
        o.inpainting_mask_weight = float(s["Conditional mask weight"])
    if "Outpaint" in s:
        o.outpaint_left, o.outpaint_top, o.outpaint_right, o.outpaint_bottom = (
            int(v) for v in s["Outpaint"].split(",")
        )
    return found


__all__ = ["SAMPLERS", "infotexts_for", "read_png_metadata", "request_from_image", "request_from_infotext"]
