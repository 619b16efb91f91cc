"""Helpers for the hostile-file suites: files laid out by the format's description, a tiny real model,
and a runner that checks each case ends in bounded time and memory in a documented error."""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

from safetensors.torch import load_file, save_file

import latentforge
from latentforge.families.detect import DetectionError
from latentforge.io.components import LoadError
from latentforge.io.tensorfile import CheckpointError, SafetensorsFile, TorchFile
from tiny import build_reference, save_folder

CLEAR = (CheckpointError, LoadError, DetectionError)
SECONDS = 5.0  # every case, loading a whole tiny model included, on a loaded 2-core machine
PEAK_BYTES = 200 * 2**20  # memory one case may add (a tiny model loaded is about 50 MB)


def write_st(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file laid out as the format describes: u64 little-endian header length, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def bounded(fn, *args):
    """Run ``fn``; return ("ok", value) or ("error", exception) after checking time and memory: Python
    allocations (tracemalloc) for the file readers, growth of the process's peak resident memory for
    whole loads (tracemalloc would slow those several times over)."""
    trace = fn in (SafetensorsFile, TorchFile)
    if trace:
        tracemalloc.start()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    try:
        out = ("ok", fn(*args))
    except CLEAR as e:
        out = ("error", e)
    finally:
        elapsed = time.perf_counter() - start
        grown = (
            tracemalloc.get_traced_memory()[1]
            if trace
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss
        )
        if trace:
            tracemalloc.stop()
    name = getattr(fn, "__name__", repr(fn))
    assert elapsed < SECONDS, f"{name} took {elapsed:.1f} s"
    assert grown < PEAK_BYTES, f"{name} needed {grown / 2**20:.0f} MiB more"
    return out


def refused(fn, *args, match: str | None = None) -> Exception:
    kind, value = bounded(fn, *args)
    assert kind == "error", f"expected a clear error, got success: {value!r}"
    if match:
        assert match in str(value), str(value)
    return value


def one(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"x": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def make_model(tmp: Path) -> dict[str, Path]:
    """A tiny SD1 model as a diffusers folder and as the single file latentforge writes from it."""
    folder = save_folder(build_reference("sd1", seed=11), tmp / "folder")
    return {"folder": folder, "single": latentforge.load(folder).save(tmp / "sd1.safetensors")}


def mutated(model: dict[str, Path], tmp_path: Path, change) -> Path:
    """The model's single file with ``change(state_dict)`` applied."""
    sd = load_file(model["single"])
    change(sd)
    save_file(sd, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def copy_folder(model: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(model["folder"], tmp_path / "copy", symlinks=True))
