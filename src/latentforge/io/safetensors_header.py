"""The safetensors header check, and the error type of every file reader (``CheckpointError``).

A header (format: https://github.com/huggingface/safetensors, "Format" section) is UTF-8 JSON: an object
``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``. ``parse_safetensors_header``
checks it completely against the size of the data section (``io/tensorfile.py`` reads the length and the
bytes): no name twice (in any object), a known dtype, a shape of non-negative integers, two integer
offsets inside the data section whose length equals the shape's bytes, and, sorted by offset, tensors
that cover the data section exactly. JSON that Python's ``json`` reads but the library's parser refuses
(lone surrogate escapes, NaN/Infinity, numbers past a double's range, nesting deeper than 127) is refused.

The work is linear in the header's size (plus a sort of the offsets). A 32 MiB header (the most
accepted) of 480,000 small entries took 7-9 s: json built millions of objects, a Python hook ran for
each, and the garbage collector ran over them again and again. Now the collector is paused while a
header is read, and there are two readers with the same checks and the same messages:

- the compact layout the safetensors library writes (no whitespace but the padding at the end, entries
  with their three fields in the order dtype, shape, data_offsets, names without escapes,
  ``__metadata__`` first if present) is
  read by one regular expression that must tile the whole header, and checked in bulk (``_compact``);
- anything else goes through ``json.loads`` with objects as tuples of pairs, which keeps every key given
  twice without a Python call per object (``_general``).
"""

from __future__ import annotations

import gc
import json
import operator
import re
from itertools import chain, compress, repeat
from pathlib import Path

import numpy as np
import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {k: v.itemsize for k, v in SAFETENSORS_DTYPES.items()}
# Real Stable Diffusion headers are well under 1 MB (SDXL: about 200 KB); 32 MiB is room for 400,000
# tensors. The safetensors library allows 100 MB.
MAX_HEADER_BYTES = 32 * 2**20
Entry = tuple[torch.dtype, tuple[int, ...], int, int]
_FIELDS = ("dtype", "shape", "data_offsets")
_BIG = 2**63  # offsets and sizes must be below this (int64 strides and offsets)
_UNFIT = -(2**70)  # stands for the elements of a shape that cannot be (never a byte count)


class CheckpointError(ValueError):
    """A file cannot be read as a checkpoint; the message says why and what to do."""


def short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: hostile names and numbers can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_safetensors_header(raw: bytes, data_size: int, path: str | Path) -> tuple[dict[str, str], dict[str, Entry]]:
    """Validate a safetensors header (the JSON bytes) against a data section of ``data_size`` bytes.

    Returns (metadata, {name: (dtype, shape, begin, end)}); raises CheckpointError naming the file, the
    tensor and the problem. Reads no tensor data; linear in the header's size, O(n log n) in tensors."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is not a valid safetensors file: {problem}; the file is damaged or not a safetensors file"
        )

    collecting = gc.isenabled()
    gc.disable()  # the objects json makes are freed by reference counting; collections only cost time
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _corrupt(path, e) from None
        _no_lone_surrogates(text, bad)
        found = _compact(text, data_size, bad, path)
        return found if found is not None else _general(text, data_size, bad, path)
    finally:
        if collecting:
            gc.enable()


# JSON that Python's json module reads but the safetensors library (serde_json) refuses, refused here too:
# escapes of half a UTF-16 surrogate pair (json makes them lone surrogates, which are not text), NaN and
# (-)Infinity, numbers beyond a double's range (1e400), and containers nested more than 127 deep.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# a high-surrogate escape not followed by a low one, or a low one not preceded by a high one
_LONE_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_MAX_DEPTH = 127  # the header object is at depth 1


def _no_lone_surrogates(text: str, bad) -> None:
    if _SURROGATE_ESCAPE.search(text) is None:  # the usual case: one scan in C
        return
    # escaped backslashes blanked out (read left to right, as JSON reads them; the length kept), every
    # backslash left starts an escape: "\\\\ud800" is a backslash and "ud800", not an escape
    m = _LONE_SURROGATE.search(text.replace("\\\\", "__"))
    if m is not None:
        raise bad(
            f"its JSON escape {m.group()} (character {m.start()}) is half of a UTF-16 surrogate pair, not a character"
        )


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _corrupt(path: str | Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} has a corrupt safetensors header ({short(str(e), 160)}); the file is damaged or not a "
        "safetensors file: re-download it"
    )


def _is_int(v: object) -> bool:
    return type(v) is int and 0 <= v < _BIG


def _plain(v: object) -> object:
    """A parsed value as json.loads gives it by default (objects as dicts), for messages."""
    if type(v) is tuple:
        return {k: _plain(x) for k, x in v}
    return [_plain(x) for x in v] if type(v) is list else v


def _kind(v: object) -> str:
    return "dict" if type(v) is tuple else type(v).__name__


def _first_duplicate(keys) -> str:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    raise AssertionError("no key is given twice")


def _mapping(pairs: tuple, bad) -> dict:
    """An object's pairs as a dict; a key given twice is refused."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise bad(f"the header names {short(_first_duplicate(k for k, _ in pairs))} twice")
    return out


_OBJECT, _ARRAY = {tuple}.__contains__, {list}.__contains__


def _no_duplicates(level: list, bad, depth: int) -> None:
    """Refuse a key given twice in any object inside the values of ``level`` (objects as tuples of
    pairs), and containers nested deeper than _MAX_DEPTH (``depth``: that of a container in ``level``),
    level by level with C-level maps: linear in the number of values, fast for millions."""
    while level:
        kinds = set(map(type, level))
        if depth > _MAX_DEPTH and kinds & {tuple, list}:
            raise bad(f"its JSON is nested more than {_MAX_DEPTH} deep (the safetensors library's limit)")
        depth += 1
        objects = list(filter(None, compress(level, map(_OBJECT, map(type, level))))) if tuple in kinds else []
        arrays = list(filter(None, compress(level, map(_ARRAY, map(type, level))))) if list in kinds else []
        dicts = list(map(dict, objects))
        if list(map(len, dicts)) != list(map(len, objects)):
            for pairs in objects:
                _mapping(pairs, bad)
        level = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(arrays)))


def _metadata(meta: object, bad) -> dict[str, str]:
    if meta is None:
        return {}
    out = _mapping(meta, bad) if type(meta) is tuple else None
    if out is None or not all(type(v) is str for v in out.values()):
        raise bad("'__metadata__' must map strings to strings")
    return out


def _entry(key: str, info: dict, data_size: int, bad, path) -> Entry:
    """One tensor's entry (its fields as a dict), checked; the messages name the tensor."""
    name = f"tensor {short(key)}"
    missing = [f for f in _FIELDS if f not in info]
    if missing:
        raise bad(f"the entry of {name} has no {', '.join(missing)}")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if type(info["dtype"]) is str else None
    if dtype is None:
        raise bad(
            f"{name} has unknown or unsupported dtype {short(_plain(info['dtype']))} "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if type(shape) is not list or not all(_is_int(s) for s in shape):
        raise bad(f"{name} has shape {short(_plain(shape))}; a shape is a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"{name} has data offsets {short(_plain(offsets))}; they must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"{name} has reversed data offsets [{begin}, {end})")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated or not a valid safetensors file: {name} has data offsets [{begin}, {end}) "
            f"but the data section holds only {data_size} bytes; re-download or re-save the file"
        )
    nbytes = 0 if 0 in shape else dtype.itemsize
    for s in shape:
        nbytes *= s
        if nbytes > 2**64:  # stop before a hostile shape makes a huge integer
            break
    if nbytes != end - begin:
        held = f"{nbytes} bytes" if nbytes <= 2**64 else "more than 2^64 bytes"
        raise bad(f"{name} has shape {short(shape)} of {info['dtype']} ({held}) but data offsets [{begin}, {end})")
    if not _span_fits(shape):
        raise bad(f"{name} has shape {short(shape)}, whose sizes multiply past 2^63")
    return dtype, tuple(shape), begin, end


def _span_fits(shape) -> bool:
    """An empty tensor still gets strides: the product of its other sizes must fit in int64."""
    span = 1
    for s in shape:
        span *= max(s, 1)
        if span >= _BIG:
            return False
    return True


def _cover(names: list[str], begins: list[int], ends: list[int], data_size: int, bad) -> None:
    """Sorted by (begin, end), the tensors must cover the data section exactly: no overlap, gap or tail."""
    if names:
        b, e = np.array(begins, dtype=np.uint64), np.array(ends, dtype=np.uint64)
        order = np.lexsort((e, b))  # stable: ties keep the header's order
        sb, se = b[order], e[order]
        if sb[0] == 0 and np.array_equal(sb[1:], se[:-1]) and se[-1] == data_size:
            return
        order = order.tolist()
    else:
        order = []
    pos, prev = 0, None
    for i in order:  # the first place it fails, named
        begin, end = begins[i], ends[i]
        if begin < pos:
            raise bad(
                f"tensor {short(names[i])} has data offsets [{begin}, {end}) that overlap tensor "
                f"{short(names[prev])} [{begins[prev]}, {ends[prev]})"
            )
        if begin > pos:
            raise bad(
                f"bytes [{pos}, {begin}) of the data section, before tensor {short(names[i])}, belong to no tensor"
            )
        pos, prev = end, i
    if pos != data_size:
        raise bad(f"the data section holds {data_size} bytes but the tensors cover only the first {pos}")


def _general(text: str, data_size: int, bad, path) -> tuple[dict[str, str], dict[str, Entry]]:
    """Any JSON layout: objects come as tuples of pairs (``object_pairs_hook=tuple``, no Python call per
    object), so that a key given twice is still there to be refused, before anything else."""
    try:
        header = json.loads(text, object_pairs_hook=tuple, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, e) from None
    if type(header) is not tuple:
        _no_duplicates([header], bad, 1)
        raise bad(f"the header is a JSON {_kind(header)}, not an object")
    top = _mapping(header, bad)
    meta = top.pop("__metadata__", None)
    names, values = list(top), list(top.values())
    objects = list(map(_OBJECT, map(type, values)))
    dicts = list(map(dict, compress(values, objects)))
    if list(map(len, dicts)) != list(map(len, compress(values, objects))):
        for pairs in compress(values, objects):
            _mapping(pairs, bad)
    # below the entries, objects can only be in fields the format does not read (the bulk type check below
    # proves it for the others), in lists given as entries, and in the metadata
    wide = compress(dicts, map((3).__lt__, map(len, dicts)))
    arrays = compress(values, map(_ARRAY, map(type, values)))
    _no_duplicates([*arrays, meta], bad, 2)
    _no_duplicates(list(chain.from_iterable(map(dict.values, wide))), bad, 3)
    meta = _metadata(meta, bad)

    def one_by_one(start: int = 0) -> None:  # the first entry at fault, named
        _no_duplicates(list(chain.from_iterable(map(dict.values, dicts))), bad, 3)  # a key twice comes first
        infos = dict(zip(compress(names, objects), dicts))
        for key in names[start:]:
            if key not in infos:
                raise bad(f"the entry of tensor {short(key)} is a JSON {_kind(top[key])}, not an object")
            _entry(key, infos[key], data_size, bad, path)
        raise AssertionError("the bulk check and _entry disagree")

    if len(dicts) != len(names):
        one_by_one()
    dtypes, shapes, offsets = (list(map(dict.get, dicts, repeat(f))) for f in _FIELDS)
    # the types in bulk: text, lists of whole numbers, pairs
    numbers = chain(chain.from_iterable(shapes), chain.from_iterable(offsets))
    if (
        not set(map(type, dtypes)) <= {str}
        or not set(map(type, shapes)) <= {list}
        or not set(map(type, offsets)) <= {list}
        or not set(map(len, offsets)) <= {2}
        or not set(map(type, numbers)) <= {int}
    ):
        one_by_one()
    begins, ends = list(map(operator.itemgetter(0), offsets)), list(map(operator.itemgetter(1), offsets))
    keys = list(map(tuple, shapes))
    known = {k: _shape_of(k) for k in set(keys)}
    _check_all(dtypes, keys, known, begins, ends, data_size, one_by_one)
    _cover(names, begins, ends, data_size, bad)
    torch_dtypes = map(SAFETENSORS_DTYPES.__getitem__, dtypes)
    return meta, dict(zip(names, zip(torch_dtypes, (known[k][0] for k in keys), begins, ends)))


def _check_all(dtypes, keys, known, begins, ends, data_size: int, one_by_one) -> None:
    """Every entry at once: a known dtype, offsets within the data and below 2^63, a sound shape (``known``:
    shape key -> (shape, elements)) whose bytes lie between the offsets. On a problem ``one_by_one(i)``
    checks from the first entry at fault (those before it are sound), for ``_entry``'s message."""
    elements = {k: v[1] for k, v in known.items()}
    unknown = set(dtypes) - _ITEMSIZE.keys()
    sizes = list(map(operator.mul, map(_ITEMSIZE.get, dtypes, repeat(1)), map(elements.__getitem__, keys)))
    held = list(map(operator.sub, ends, begins))
    limit = min(data_size, _BIG - 1)
    if unknown or sizes != held or (ends and (max(ends) > limit or min(begins) < 0)):
        first = [dtypes.index(d) for d in unknown]
        first.append(next((i for i, (a, b) in enumerate(zip(sizes, held)) if a != b), len(ends)))
        first.append(next((i for i, (b, e) in enumerate(zip(begins, ends)) if e > limit or b < 0), len(ends)))
        one_by_one(min(first))


_NUM = r"(?:0|[1-9][0-9]{0,18})"  # JSON integers (no leading zero), up to 19 digits
_TEXT = r'[^"\\\x00-\x1f]*'  # JSON string contents without escapes
_ENTRY = re.compile(  # an entry and the comma after it (the body gets one at its end)
    rf'"({_TEXT})":\{{"dtype":"({_TEXT})","shape":\[([0-9,]*)\],"data_offsets":\[({_NUM}),({_NUM})\]\}},'
)
_SHAPE = re.compile(rf"(?:{_NUM}(?:,{_NUM})*)?")
_META = '{"__metadata__":'
_DECODER = json.JSONDecoder(object_pairs_hook=tuple, parse_constant=_no_constant, parse_float=_finite)


def _compact(text: str, data_size: int, bad, path) -> tuple[dict[str, str], dict[str, Entry]] | None:
    """The safetensors library's compact layout, read by ``_ENTRY`` and checked in bulk; None when the
    header is in another layout (``_general`` reads it). The checks come in ``_general``'s order, and on
    a problem the entries are checked one by one by ``_entry``: the message is the one ``_general`` gives."""
    text = text.strip(" \t\n\r")  # JSON's whitespace: the safetensors library pads the header with spaces
    if not (text.startswith("{") and text.endswith("}")):
        return None
    meta, start = None, 1
    if text.startswith(_META):
        try:
            meta, start = _DECODER.raw_decode(text, len(_META))
        except (ValueError, RecursionError):
            return None
        if start < len(text) - 1 and text[start] == "," and start + 2 < len(text):
            start += 1
        elif start != len(text) - 1:  # the metadata is the last member, or junk follows it
            return None
    body = text[start:-1]
    parts = _ENTRY.split(body + ",") if body else [""]
    # between (and around) the matches there must be nothing: then they tile the body exactly
    names, dtypes, shapes, firsts, lasts = (parts[i::6] for i in range(1, 6))
    n = len(names)
    known = {s: _shape(s) for s in set(shapes)}  # a model has few distinct shapes: each is read once
    if "".join(parts[::6]) or None in known.values() or "__metadata__" in names:
        return None
    ends = list(map(int, lasts))
    # written in offset order (as the safetensors library writes), each tensor begins where the one before
    # ends: then the digits say so, and the begins are the ends shifted
    chain_ = n > 0 and firsts[0] == "0" and firsts[1:] == lasts[:-1]
    begins = [0, *ends[:-1]] if chain_ else list(map(int, firsts))
    shape_of = {k: v[0] for k, v in known.items()}
    torch_dtypes = map(SAFETENSORS_DTYPES.get, dtypes)  # None for unknown ones: refused below
    entries = dict(zip(names, zip(torch_dtypes, map(shape_of.__getitem__, shapes), begins, ends)))
    if len(entries) != n:
        raise bad(f"the header names {short(_first_duplicate(names))} twice")
    _no_duplicates([meta], bad, 2)
    meta = _metadata(meta, bad)

    def one_by_one(start: int) -> None:
        for i in range(start, n):
            info = {"dtype": dtypes[i], "shape": list(known[shapes[i]][0]), "data_offsets": [begins[i], ends[i]]}
            _entry(names[i], info, data_size, bad, path)
        raise AssertionError("the bulk check and _entry disagree")

    _check_all(dtypes, shapes, known, begins, ends, data_size, one_by_one)
    if not (chain_ and ends[-1] == data_size):  # a chain from 0 to the end covers the data exactly
        _cover(names, begins, ends, data_size, bad)
    return meta, entries


def _shape(text: str) -> tuple[tuple[int, ...], int] | None:
    """``_shape_of`` a shape's text in the header; None when it is not JSON integers."""
    if not _SHAPE.fullmatch(text):
        return None
    return _shape_of(tuple(map(int, text.split(","))) if text else ())


def _shape_of(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(shape, elements) of a shape of whole numbers; elements is ``_UNFIT`` when a size is negative or
    2^63 or more, or the sizes multiply past 2^63 as strides (``_entry`` says which): no byte count
    equals a multiple of it."""
    if (shape and (min(shape) < 0 or max(shape) >= _BIG)) or not _span_fits(shape):
        return shape, _UNFIT
    elements = 1
    for s in shape:
        elements *= s
    return shape, elements
