"""Generation parameters written into and read back from PNG files: A1111 infotext and our JSON."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from latentforge.io.hashing import model_hash
from latentforge.io.infotext import format_infotext, parse_infotext
from latentforge.pipelines.checks import is_int, show
from latentforge.pipelines.request import GenerationRequest, HiresOptions, RequestError
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


def infotext_params(pipe, req: GenerationRequest, seed: int, info, schedule: str, img2img: bool) -> dict:
    from latentforge._version import __version__

    params = {
        "Steps": req.steps,
        "Sampler": info.title,
        "Schedule type": SCHEDULE_TITLES[schedule],
        "CFG scale": _num(req.cfg_scale),
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        **_model_fields(pipe),
        "Denoising strength": _num(req.denoising_strength) if img2img or req.hires else None,
        **(_hires_fields(req.hires) if req.hires and not img2img else {}),
        "Clip skip": req.clip_skip if req.clip_skip and req.clip_skip > 1 else None,
        "Eta": _num(req.eta) if req.eta is not None else None,
        "RNG": "CPU",
        "Version": f"latentforge {__version__}",
    }
    return params


def _hires_fields(h: HiresOptions) -> dict:
    """A1111's names for the hires fix settings."""
    resize = h.resize_x or h.resize_y
    return {
        "Hires upscale": None if resize else _num(h.scale),
        "Hires resize": f"{h.resize_x}x{h.resize_y}" if resize else None,
        "Hires steps": h.second_pass_steps or None,
        "Hires upscaler": h.upscaler,
    }


def _num(x: float) -> str:
    return f"{x:g}"


def infotexts_for(pipe, req: GenerationRequest, seeds: list[int], info, schedule: str, img2img: bool) -> list[str]:
    return [
        format_infotext(req.prompt, req.negative_prompt, infotext_params(pipe, req, s, info, schedule, img2img))
        for s in seeds
    ]


def request_json(pipe, req: GenerationRequest, seed: int, img2img: bool) -> str:
    """Our exact record of one image: the request of the pass that made it (its first seed, its batch
    size) and the image's index in that pass, so the same pixels can be made again."""
    index = (seed - req.seed) % req.batch_size
    data = {
        "latentforge": 1,
        "mode": "img2img" if img2img else "txt2img",
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
    """{"parameters": infotext or None, "latentforge": parsed JSON or None} of an image file. Only the
    header and text chunks are read (no pixels); PIL's limits bound the text. A file that is not an
    image, or whose ``latentforge`` text is not JSON, is a RequestError naming the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixels are decoded here
            with Image.open(path) as im:
                text = dict(im.info)
    except Exception as e:  # any failure of a decoder on a hostile file means "cannot read"
        raise RequestError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    parameters = text.get("parameters")
    if parameters is not None and not isinstance(parameters, str):
        raise RequestError(f"{path}: its 'parameters' text is not text ({type(parameters).__name__})")
    ours = text.get("latentforge")
    parsed = None
    if ours:
        try:
            parsed = json.loads(ours)
        except (ValueError, TypeError, RecursionError) as e:
            raise RequestError(
                f"{path}: its 'latentforge' record is not valid JSON ({type(e).__name__}); "
                "remove the option --from or use another image"
            ) from None
    return {"parameters": parameters or None, "latentforge": parsed}


def request_from_image(path: str | Path) -> tuple[GenerationRequest, dict]:
    """The request that made an image: exact from our JSON if present, else from the A1111 infotext.
    Returns (request, {"mode", "model", "source", "batch_index"}). The whole record is checked first
    (types, known mode, batch_index within the batch): a RequestError names the file and the field."""
    meta = read_png_metadata(path)
    if meta["latentforge"] is not None:
        try:
            return _from_record(meta["latentforge"])
        except RequestError as e:
            raise RequestError(f"{path}: latentforge record: {e}") from None
    if not meta["parameters"]:
        raise RequestError(f"{path} carries no generation parameters (no 'parameters' or 'latentforge' text)")
    try:
        return request_from_infotext(meta["parameters"])
    except RequestError as e:
        raise RequestError(f"{path}: parameters: {e}") from None


def _from_record(record) -> tuple[GenerationRequest, dict]:
    if not isinstance(record, dict):
        raise RequestError(f"must be a JSON object, got {show(record)}")
    if record.get("latentforge") != 1:
        raise RequestError(
            f"version {show(record.get('latentforge'))} is not 1 (written by another version of latentforge?)"
        )
    if record.get("mode") not in ("txt2img", "img2img"):
        raise RequestError(f"mode must be 'txt2img' or 'img2img', got {show(record.get('mode'))}")
    if not isinstance(record.get("request"), dict):
        raise RequestError(f"request must be a JSON object, got {show(record.get('request'))}")
    model = record.get("model", {})
    if not isinstance(model, dict):
        raise RequestError(f"model must be a JSON object, got {show(model)}")
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


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", text, re.I)
    if not m:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


def request_from_infotext(text: str) -> tuple[GenerationRequest, dict]:
    """A request from A1111's infotext; a value that does not convert is a RequestError naming its field
    (ranges are checked by ``GenerationRequest.validate``)."""
    prompt, negative, s = parse_infotext(text)
    req = GenerationRequest(prompt=prompt, negative_prompt=negative)
    whole, number = "a whole number", "a number"
    if "Steps" in s:
        req.steps = _value(s, "Steps", int, whole)
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
        req.cfg_scale = _value(s, "CFG scale", float, number)
    if "Seed" in s:
        req.seed = _value(s, "Seed", int, whole)
    if "Size" in s:
        req.width, req.height = _value(s, "Size", _size, "a size WIDTHxHEIGHT")
    if "Denoising strength" in s:
        req.denoising_strength = _value(s, "Denoising strength", float, number)
    if "Clip skip" in s:
        req.clip_skip = _value(s, "Clip skip", int, whole)
    if "Eta" in s:
        req.eta = _value(s, "Eta", float, number)
    hires = {"Hires upscale", "Hires resize", "Hires steps", "Hires upscaler"}
    if hires & set(s):
        h = req.hires = HiresOptions()
        if "Hires upscale" in s:
            h.scale = _value(s, "Hires upscale", float, number)
        if "Hires resize" in s:
            h.resize_x, h.resize_y = _value(s, "Hires resize", _size, "a size WIDTHxHEIGHT")
        if "Hires steps" in s:
            h.second_pass_steps = _value(s, "Hires steps", int, whole)
        h.upscaler = s.get("Hires upscaler", h.upscaler)
    known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip", "Eta"}
    known |= hires
    req.extra = {k: v for k, v in s.items() if k not in known}
    mode = "img2img" if "Denoising strength" in s and not req.hires else "txt2img"
    model = {"name": s.get("Model"), "hash": s.get("Model hash")}
    return req, {"mode": mode, "model": model, "source": "infotext", "batch_index": 0}


__all__ = ["SAMPLERS", "infotexts_for", "read_png_metadata", "request_from_image", "request_from_infotext"]
