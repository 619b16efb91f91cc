"""Checks shared by requests and the files they come from: the error type, limits, and field types.

Requests arrive from JSON, PNG metadata and command lines, so every field is checked for its type
(a bool is not a number, a string is not a number) and range before any work.
"""

from __future__ import annotations

import math
from dataclasses import fields


class RequestError(ValueError):
    """A request that cannot run; the message says which field and what is allowed."""


MAX_STEPS = 1000
MAX_SIDE = 8192  # pixels, width and height (explicit, from an init image, or after hires)
MAX_INPUT_PIXELS = 8192 * 8192  # pixels of an image file read as input (checked before decoding)
# numeric fields that are finite numbers within a range (s_tmax may be infinite: "no upper bound")
RANGES = {
    "denoising_strength": (0.0, 1.0),
    "eta": (0.0, 10.0),
    "s_churn": (0.0, 100.0),
    "s_tmin": (0.0, 1e4),
    "s_tmax": (0.0, math.inf),
    "s_noise": (0.0, 100.0),
    "aesthetic_score": (0.0, 10.0),
    "negative_aesthetic_score": (0.0, 10.0),
}


def is_int(value: object) -> bool:
    """A whole number (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float (not a bool); finiteness is checked by the caller."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(value: object) -> str:
    """A value for an error message, cut short (it may come from a file)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KINDS = {
    "int": ("a whole number", is_int),
    "float": ("a number", is_number),
    "str": ("text", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
}


def optional(cls: type, name: str) -> bool:
    """Whether field ``name`` of dataclass ``cls`` may be None."""
    return any(f.name == name and (f.type.endswith("| None") or f.type == "Any") for f in fields(cls))


def check_types(cls: type, values: dict, where: str = "") -> None:
    """RequestError unless each value in ``values`` has its field's type in ``cls`` (int, float, str,
    bool, dict, optionally None; a bool is not a number here). Other fields (groups, Any) are left to
    their own checks."""
    for f in fields(cls):
        if f.name not in values:
            continue
        may_be_none = f.type.endswith("| None")
        kind = _KINDS.get(f.type.removesuffix(" | None"))
        value = values[f.name]
        if kind is None or (may_be_none and value is None):
            continue
        what, ok = kind
        if not ok(value):
            what += " or none" if may_be_none else ""
            raise RequestError(f"{where}{f.name} must be {what}, got {type(value).__name__} {show(value)}")
