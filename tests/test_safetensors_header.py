"""The safetensors header check's two readers agree, and the largest header is read quickly.

``parse_safetensors_header`` reads the compact layout the safetensors library writes with one regular
expression and checks it in bulk, and any other layout through ``json.loads`` one entry at a time
(``_general``). Headers are generated (hypothesis) in the compact layout, mutated the ways a damaged or
hostile file is, and each is given to both readers: the same entries, or the same error message. The
reference library's verdicts are checked in test_fuzz_files.py.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import latentforge.io.safetensors_header as sh
from latentforge.io.safetensors_header import MAX_HEADER_BYTES, CheckpointError, parse_safetensors_header

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


def _outcome(fn):
    try:
        meta, entries = fn()
    except CheckpointError as e:
        return "error", str(e)
    return "ok", meta, entries


def _both(raw: bytes, data_size: int) -> tuple:
    """(the outcome of parse_safetensors_header, that of the json reader alone, whether the compact
    reader took the header)."""
    ours = _outcome(lambda: parse_safetensors_header(raw, data_size, "f.safetensors"))
    text = raw.decode("utf-8", "replace")

    def bad(problem):
        return CheckpointError(
            f"f.safetensors is not a valid safetensors file: {problem}; the file is damaged or not a safetensors file"
        )

    reference = _outcome(lambda: sh._general(text, data_size, bad, "f.safetensors"))
    try:
        took = sh._compact(text, data_size, bad, "f.safetensors") is not None
    except CheckpointError:
        took = True
    return ours, reference, took


@st.composite
def headers(draw):
    """(compact header text, data size): a valid header, then up to three changes."""
    n = draw(st.integers(0, 5))
    entries, pos = [], 0
    for i in range(n):
        dtype = draw(st.sampled_from(list(SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = SIZES[dtype]
        for s in shape:
            size *= s
        name = draw(st.sampled_from([f"t{i}", f"layer.{i}.weight", f"é{i}", f"t{i} [x]"]))
        entries.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}])
        pos += size
    data_size = pos
    meta = draw(st.sampled_from([None, {"format": "pt"}, {}, "skip"]))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(
            st.sampled_from(
                ["offset", "huge", "shape", "dtype", "dup", "order", "data", "meta", "name", "drop", "bignum"]
            )
        )
        if not entries and what not in ("data", "meta"):
            continue
        i = draw(st.integers(0, len(entries) - 1)) if entries else 0
        info = entries[i][1] if entries else None
        if what == "offset" and "data_offsets" in info:
            info["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1, 4, 10**6]))
        elif what == "huge" and "data_offsets" in info:
            info["data_offsets"][1] = draw(st.sampled_from([2**63 - 1, 2**63, 10**19 - 1, 10**19]))
        elif what == "shape":
            info["shape"] = draw(st.lists(st.sampled_from([0, 1, 5, 2**31, 2**62, 2**63, 10**19 - 1]), max_size=4))
        elif what == "dtype":
            info["dtype"] = draw(st.sampled_from(["F8_E8M0", "f32", "", "U64", "BOOL"]))
        elif what == "dup":
            entries.append([entries[i][0], json.loads(json.dumps(info))])
        elif what == "order":
            entries.reverse()
        elif what == "data":
            data_size += draw(st.sampled_from([-1, 1, 8]))
        elif what == "meta":
            meta = draw(st.sampled_from([{"a": 1}, {"a": {"b": "c"}}, ["x"], "x", {"k": None}]))
        elif what == "name":
            entries[i][0] = draw(st.sampled_from(["__metadata__", 'a"b', "a\\b", "tab\tname", ""]))
        elif what == "drop":
            info.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif what == "bignum":
            info["shape"] = [draw(st.sampled_from([10**20, 2**64]))]
    members = [] if meta == "skip" else [json.dumps({"__metadata__": meta}, separators=(",", ":"))[1:-1]]
    for name, info in entries:
        members.append(json.dumps({name: info}, separators=(",", ":"), ensure_ascii=False)[1:-1])
    return "{" + ",".join(members) + "}", max(data_size, 0)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(headers(), st.booleans())
def test_the_compact_reader_agrees_with_the_json_reader(case, spaced):
    text, data_size = case
    if spaced:  # the same header as json.dumps writes it: the json reader takes it
        text = json.dumps(json.loads(text, object_pairs_hook=lambda pairs: dict(pairs)), ensure_ascii=False)
    ours, reference, _ = _both(text.encode(), data_size)
    assert ours == reference


def test_the_compact_reader_takes_what_the_safetensors_library_writes():
    import torch

    padded = 0
    for count in (3, 50):
        tensors = {f"block.{i}.weight": torch.zeros(i % 3, 4, dtype=torch.float16) for i in range(count)}
        tensors["scale"] = torch.ones((), dtype=torch.float32)
        blob = save(tensors, metadata={"format": "pt", "note": 'a "quoted" value'})
        n = int.from_bytes(blob[:8], "little")
        raw, data_size = blob[8 : 8 + n], len(blob) - 8 - n
        padded += raw.endswith(b" ")  # the library pads the header with spaces to a multiple of 8 bytes
        ours, reference, took = _both(raw, data_size)
        assert took and ours == reference and ours[0] == "ok"
        assert ours[1] == {"format": "pt", "note": 'a "quoted" value'}
        assert set(ours[2]) == set(tensors) and ours[2]["block.2.weight"][1] == (2, 4)
    assert padded


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', "corrupt safetensors header"),  # leading 0
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}', "corrupt safetensors header"),  # trailing ,
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}x}', "corrupt safetensors header"),
        (b'{"__metadata__":{},}', "corrupt safetensors header"),
        (b'{"__metadata__":{"a":"b","a":"c"}}', "names 'a' twice"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"c":{"k":1,"k":2}}}', "names 'k' twice"),
        (b'{"a":{"dtype":"F32","shape":[1,,1],"data_offsets":[0,4]}}', "corrupt safetensors header"),
    ],
)
def test_what_is_not_json_or_names_a_key_twice_is_refused(raw, message):
    ours, reference, _ = _both(raw, 4)
    assert ours == reference and ours[0] == "error" and message in ours[1], ours


def _many_small_entries() -> tuple[bytes, int, int]:
    """The largest header accepted, of 1-element tensors: about 480,000 entries."""
    parts, pos, size = [], 0, 2
    while True:
        part = f'"t{len(parts)}":{{"dtype":"F32","shape":[1],"data_offsets":[{pos},{pos + 4}]}}'
        if size + len(part) + 1 > MAX_HEADER_BYTES:
            break
        parts.append(part)
        size += len(part) + 1
        pos += 4
    return ("{" + ",".join(parts) + "}").encode(), pos, len(parts)


def test_the_largest_headers_are_read_in_bounded_time():
    """32 MiB of small entries took 7-9 s (a Python hook per JSON object, the garbage collector over
    millions of objects); now about 1 s on a loaded 2-core machine, and a bug reintroducing either
    would be several times over this generous bound."""
    raw, data_size, n = _many_small_entries()
    start = time.perf_counter()
    meta, entries = parse_safetensors_header(raw, data_size, "f.safetensors")
    assert len(entries) == n > 400_000 and entries[f"t{n - 1}"][3] == data_size
    assert time.perf_counter() - start < 5
    text = '{"__metadata__":{"x":"' + "a" * (MAX_HEADER_BYTES - 100) + '"}}'  # one long string
    start = time.perf_counter()
    meta, entries = parse_safetensors_header(text.encode(), 0, "f.safetensors")
    assert len(meta["x"]) == MAX_HEADER_BYTES - 100 and entries == {}
    assert time.perf_counter() - start < 5
