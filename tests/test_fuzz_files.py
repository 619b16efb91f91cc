"""Hostile model files: every case ends quickly, in bounded memory, in a documented error or success.

Safetensors headers are generated (hypothesis) and judged against the reference library
(``safetensors.safe_open``, the format's own implementation): whatever it refuses we refuse, whatever we
accept it accepts with the same bytes, and where we are stricter (duplicate names, dtypes torch lacks)
the message says so. Hand-made cases follow the format description ("Format" in the safetensors README:
u64 header length, JSON header, byte buffer) and check the error names the tensor and the problem.
Single files are tiny real checkpoints (``tests/tiny.py``) with key names, shapes, dtypes or bytes
changed; folders are tiny diffusers folders with path tricks and absurd config values.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import latentforge
from latentforge.cli import main
from latentforge.families.detect import DetectionError
from latentforge.io.components import LoadError
from latentforge.io.tensorfile import CheckpointError, SafetensorsFile, TorchFile
from latentforge.loading import inspect_checkpoint
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
    assert elapsed < SECONDS, f"{fn.__name__} took {elapsed:.1f} s"
    assert grown < PEAK_BYTES, f"{fn.__name__} needed {grown / 2**20:.0f} MiB more"
    return out


def refused(fn, *args, match: str | None = None) -> Exception:
    kind, value = bounded(fn, *args)
    assert kind == "error", f"expected a clear error, got success: {value!r}"
    if match:
        assert match in str(value), str(value)
    return value


# --- safetensors headers, generated and judged by the reference library ----------------------------

_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8, "I16": 2}
_FOREIGN = ["F8_E8M0", "F4", "C64", "f32", "", "Q4"]  # names torch or latentforge cannot read


@st.composite
def st_files(draw):
    """(header object or raw bytes, data bytes, whether we may be stricter than the reference)."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    pos = 0
    for i in range(n):
        dtype = draw(st.sampled_from(list(_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = _DTYPES[dtype] * (0 if 0 in shape else int(torch.tensor(shape or [1]).prod()))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    data = bytearray(draw(st.binary(min_size=pos, max_size=pos)))
    stricter = False
    for _ in range(draw(st.integers(0, 2))):
        if not header:
            break
        name = draw(st.sampled_from(sorted(header)))
        entry = header[name]
        what = draw(
            st.sampled_from(["offset", "swap", "shape", "dtype", "foreign", "drop", "type", "extra", "meta", "cut"])
        )
        if what == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-3, -1, 1, 2, 10**6, -(10**6)]))
        elif what == "swap":
            entry["data_offsets"].reverse()
        elif what == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 10**12), max_size=4))
        elif what == "dtype":
            entry["dtype"] = draw(st.sampled_from(list(_DTYPES)))
        elif what == "foreign":
            entry["dtype"] = draw(st.sampled_from(_FOREIGN))
            stricter = True
        elif what == "drop":
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif what == "type":
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            entry[field] = draw(st.sampled_from([None, 1.5, "x", [1.0, 2.0], {"a": 1}, True, [0, 1, 2]]))
        elif what == "extra":
            entry["comment"] = "ignored by the format"
        elif what == "meta":
            header["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, [], "x", None, {"k": None}]))
        elif what == "cut":
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    raw = json.dumps(header).encode()
    if draw(st.booleans()) and header:  # the same name twice, as raw JSON (a dict cannot hold it)
        first = next(iter(header))
        dup = json.dumps({first: header[first]})[1:-1].encode()
        raw = raw[:-1] + b", " + dup + b"}"
        stricter = True
    return raw, bytes(data), stricter


def _reference(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the reference library raises its own error types
        return e


def _ours(path: Path):
    kind, value = bounded(SafetensorsFile, path)
    if kind == "error":
        return value
    try:
        return {k: value.read(k) for k in value.keys()}
    finally:
        value.close()


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st_files())
def test_generated_headers_agree_with_the_reference_library(tmp_path_factory, case):
    raw, data, stricter = case
    path = write_st(tmp_path_factory.mktemp("st") / "f.safetensors", raw, data)
    ours, ref = _ours(path), _reference(path)
    if isinstance(ours, dict):
        assert isinstance(ref, dict), f"we accepted what the reference refuses ({ref}): {raw!r}"
        assert ours.keys() == ref.keys()
        for k in ours:
            assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
            a, b = ours[k].reshape(-1), ref[k].reshape(-1)
            if a.dtype == torch.bool:  # a bool byte other than 0/1 is read as True (1): torch's copy normalises it
                a, b = a.view(torch.uint8) != 0, b.view(torch.uint8) != 0
            assert a.view(torch.uint8).tolist() == b.view(torch.uint8).tolist()  # bytes: NaNs compare too
    elif isinstance(ref, dict):  # only where we are documented to be stricter
        assert stricter and ("twice" in str(ours) or "unsupported dtype" in str(ours)), str(ours)
    assert isinstance(ours, (dict, CheckpointError)), type(ours)


def _one(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"x": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


HEADERS = {
    "negative offset": (_one(offsets=(-8, 0)), b"\0" * 8, "data offsets [-8, 0]; they must be two non-negative"),
    "reversed offsets": (_one(offsets=(8, 0)), b"\0" * 8, "reversed data offsets [8, 0)"),
    "offsets past the data": (_one(offsets=(0, 8)), b"\0" * 4, "truncated"),
    "shape disagrees with bytes": (_one(shape=(3,)), b"\0" * 8, "shape [3] of F32 (12 bytes) but data offsets [0, 8)"),
    "huge shape": (_one(shape=(2**40, 2**40)), b"\0" * 8, "more than 2^64 bytes"),
    "negative shape": (_one(shape=(-2,)), b"\0" * 8, "a shape is a list of non-negative integers"),
    "float offsets": (_one(offsets=(0.0, 8.0)), b"\0" * 8, "must be two non-negative integers"),
    "unknown dtype": (_one(dtype="F8_E8M0"), b"\0" * 8, "unknown or unsupported dtype 'F8_E8M0'"),
    "header is a list": ([1, 2], b"", "the header is a JSON list, not an object"),
    "entry is a string": ({"x": "F32"}, b"", "the entry of tensor 'x' is a JSON str"),
    "entry lacks offsets": ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "has no data_offsets"),
    "metadata not str->str": ({"__metadata__": {"a": 1}, **_one()}, b"\0" * 8, "'__metadata__' must map strings"),
    "gap before a tensor": (_one(offsets=(4, 12)), b"\0" * 12, "bytes [0, 4) of the data section"),
    "bytes after the last tensor": (_one(), b"\0" * 12, "the tensors cover only the first 8"),
    "overlap": (
        {**_one(), "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        "tensor 'y' has data offsets [4, 12) that overlap tensor 'x' [0, 8)",
    ),
    "duplicate key": (
        b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        b"\0",
        "names 'x' twice",
    ),
    "not JSON": (b"\xff\xfe{}", b"", "corrupt safetensors header"),
    "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt safetensors header"),
    "4000-digit number": (b'{"x": {"dtype": "U8", "shape": [' + b"9" * 5000 + b"]}}", b"", "corrupt"),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_hostile_header_is_refused_by_name(tmp_path, name):
    header, data, message = HEADERS[name]
    path = write_st(tmp_path / "h.safetensors", header, data)
    err = refused(SafetensorsFile, path, match=message)
    assert str(path) in str(err) and "\n" not in str(err)
    assert not isinstance(_reference(path), dict) or name in ("duplicate key", "unknown dtype")


def test_header_length_field_larger_than_the_file_or_the_cap(tmp_path):
    refused(SafetensorsFile, write_st(tmp_path / "a.safetensors", b"{}", length=10**18), match="> file size")
    big = tmp_path / "b.safetensors"
    with open(big, "wb") as f:  # a sparse file bigger than the cap, so only the cap can refuse it
        f.write(struct.pack("<Q", 40 * 2**20))
        f.truncate(41 * 2**20)
    refused(SafetensorsFile, big, match="exceeds latentforge's limit of 33554432 bytes")


def test_empty_file_directory_and_pipe(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    refused(latentforge.load, tmp_path / "e.safetensors", match="0 bytes long")
    (tmp_path / "d.safetensors").mkdir()
    refused(SafetensorsFile, tmp_path / "d.safetensors", match="is a folder, not a weights file")
    refused(TorchFile, tmp_path / "d.safetensors", match="is a folder, not a weights file")
    import os

    os.mkfifo(tmp_path / "p.safetensors")  # opening a pipe would block forever
    refused(SafetensorsFile, tmp_path / "p.safetensors", match="not a regular file")


# --- .ckpt files ----------------------------------------------------------------------------------


def _rezip(src: Path, dst: Path, compress: int = zipfile.ZIP_STORED, change=lambda name, data: data) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))
    return dst


def test_hostile_ckpt_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, good)
    assert TorchFile(_rezip(good, tmp_path / "rezip.ckpt")).read("w").tolist() == [0, 1, 2, 3]
    # a zip member inflating 1000:1 (a 32 KB file holding 32 MB) must not be expanded
    big = _rezip(
        good, tmp_path / "bomb.ckpt", zipfile.ZIP_DEFLATED, lambda n, d: b"\0" * 2**25 if n.endswith("/0") else d
    )
    assert big.stat().st_size < 2**20
    refused(TorchFile, big, match="is compressed")
    # a member claiming more bytes than the file has (size fields of the central directory changed)
    data = bytearray(good.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = struct.pack("<I", 2**31)  # uncompressed size of the last member
    data[cd + 20 : cd + 24] = struct.pack("<I", 2**31)  # compressed size
    (tmp_path / "claims.ckpt").write_bytes(bytes(data))
    refused(TorchFile, tmp_path / "claims.ckpt", match="claims")
    (tmp_path / "junk.ckpt").write_bytes(b"hello world" * 10)  # neither zip nor pickle
    refused(TorchFile, tmp_path / "junk.ckpt", match="could not be read as a PyTorch checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    refused(TorchFile, tmp_path / "empty.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:300])
    refused(TorchFile, tmp_path / "cut.ckpt", match="truncated or corrupt")
    loop: dict = {}
    loop["state_dict"] = loop  # a dictionary that contains itself
    torch.save(loop, tmp_path / "loop.ckpt")
    refused(TorchFile, tmp_path / "loop.ckpt", match="nested more than 8 deep")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    refused(TorchFile, tmp_path / "list.ckpt", match="holds a list")


# --- single-file checkpoints: tiny real ones, mutated -----------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD1 model as a diffusers folder and as the single file latentforge writes from it."""
    tmp = tmp_path_factory.mktemp("fuzz_model")
    folder = save_folder(build_reference("sd1", seed=11), tmp / "folder")
    return {"folder": folder, "single": latentforge.load(folder).save(tmp / "sd1.safetensors")}


def _mutated(model, tmp_path: Path, change) -> Path:
    sd = load_file(model["single"])
    change(sd)
    save_file(sd, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


U = "model.diffusion_model."


def _rename(old: str, new: str):
    def change(sd):
        sd[new] = sd.pop(old)

    return change


def _reshape(key: str, shape: tuple[int, ...]):
    def change(sd):
        sd[key] = torch.zeros(shape)

    return change


SINGLE = {
    "block index far above any model": (
        _rename(U + "input_blocks.1.0.in_layers.0.weight", U + "input_blocks.99999.0.in_layers.0.weight"),
        "block index '99999', above latentforge's limit of",
    ),
    "a million-digit block index": (
        _rename(U + "input_blocks.1.0.in_layers.0.weight", U + "input_blocks." + "9" * 10**6 + ".0.w"),
        "(MAX_INDEX, far above any real model)",
    ),
    "17 res blocks per level": (
        _rename(U + "input_blocks.1.0.in_layers.0.weight", U + "input_blocks.71.0.in_layers.0.weight"),
        "17 res blocks per level, above latentforge's limit of 16",
    ),
    "conv_in of rank 1": (_reshape(U + "input_blocks.0.0.weight", (32,)), "expected 4 dimensions"),
    "conv_in with no channels": (_reshape(U + "input_blocks.0.0.weight", (0, 4, 3, 3)), "no channels"),
    "level width not a multiple": (
        _reshape(U + "input_blocks.1.0.out_layers.3.weight", (33, 32, 3, 3)),
        "level 0 width 33 is not a multiple of model channels 32",
    ),
    "VAE with no channels": (_reshape("first_stage_model.encoder.conv_in.weight", (0, 3, 3, 3)), "VAE"),
    "token embedding of rank 1": (
        _reshape("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408,)),
        "expected 2 dimensions",
    ),
    "unet weight shape changed": (_reshape(U + "out.2.bias", (5,)), "out.2.bias: file [5], model [4]"),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_mutated_single_file_is_refused_quickly(model, tmp_path, name, capsys):
    change, message = SINGLE[name]
    path = _mutated(model, tmp_path, change)
    err = refused(latentforge.load, path, match=message)
    assert str(path) in str(err)
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert not (tmp_path / "out").exists()
    out = capsys.readouterr().err
    assert out.startswith("latentforge: error:") and "Traceback" not in out


def test_tiny_file_claiming_a_huge_architecture(tmp_path, capsys):
    """A 2.6 KB file of empty tensors whose names claim 99999 blocks, or 20 levels, fails at once."""
    names = [U + "input_blocks.0.0.weight", U + "out.2.weight", U + "time_embed.0.weight"]
    names += [U + f"input_blocks.{i}.0.op.weight" for i in range(3, 60, 3)]  # 19 downsamplers: 20 levels
    header = {n: {"dtype": "F32", "shape": [0, 0, 0, 0], "data_offsets": [0, 0]} for n in names}
    path = write_st(tmp_path / "levels.safetensors", header)
    assert path.stat().st_size < 4096
    refused(inspect_checkpoint, path, match="20 UNet levels, above latentforge's limit of 8")
    header[U + "input_blocks.99999.1.transformer_blocks.99999.attn1.to_q.weight"] = header[names[0]]
    path = write_st(tmp_path / "deep.safetensors", header)
    refused(inspect_checkpoint, path, match="has block index '99999', above latentforge's limit of")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "MAX_INDEX" in err


def test_truncated_single_file_at_every_region(model, tmp_path):
    data = model["single"].read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, n // 2, n, n + 1, (n + len(data)) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        refused(latentforge.load, tmp_path / "cut.safetensors")


def test_weights_stored_as_integers_are_refused(model, tmp_path):
    key = U + "out.2.weight"
    path = _mutated(model, tmp_path, lambda sd: sd.__setitem__(key, sd[key].to(torch.int8)))
    refused(latentforge.load, path, match="out.2.weight")


def test_cli_exit_code_and_one_line_in_a_real_process(tmp_path):
    import subprocess
    import sys

    path = write_st(tmp_path / "x.safetensors", _one(offsets=(8, 0)), b"\0" * 8)
    run = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "reversed data offsets [8, 0)" in run.stderr, run.stderr


# --- diffusers folders: path tricks and absurd configs ----------------------------------------------


def _copy(model, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model["folder"], tmp_path / "copy", symlinks=True))


def _shard_index(folder: Path, weight_map: dict) -> None:
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("entry", ["../../outside.safetensors", "/etc/passwd", "..\\outside.safetensors", "C:/x"])
def test_shard_index_entry_leaving_the_folder_is_refused(model, tmp_path, entry):
    folder = _copy(model, tmp_path)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "outside.safetensors")
    _shard_index(folder, {"conv_in.weight": entry})
    err = refused(latentforge.load, folder, match="which is not a path inside the folder")
    assert "weight_map entry" in str(err) and repr(entry) in str(err)


def test_shards_inside_the_folder_load_and_overlapping_shards_are_refused(model, tmp_path):
    folder = _copy(model, tmp_path)
    sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, folder / "unet" / "a.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, folder / "unet" / "b.safetensors")
    _shard_index(folder, {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(keys)})
    kind, pipe = bounded(latentforge.load, folder)  # a documented success
    assert kind == "ok" and torch.equal(pipe.unet.state_dict()["out.2.bias"], sd["conv_out.bias"])
    save_file({k: sd[k] for k in keys[half - 1 :]}, folder / "unet" / "b.safetensors")
    refused(latentforge.load, folder, match="is in two shards")


@pytest.mark.parametrize("what", ["weights", "config", "component folder", "tokenizer", "dangling"])
def test_symlinks_leaving_the_folder_are_refused(model, tmp_path, what):
    folder = _copy(model, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "component folder":
        shutil.move(folder / "unet", outside / "unet")
        (folder / "unet").symlink_to(outside / "unet")
        name = "unet/config.json"
    else:
        name = {
            "weights": "unet/diffusion_pytorch_model.safetensors",
            "config": "vae/config.json",
            "tokenizer": "tokenizer/vocab.json",
            "dangling": "text_encoder/model.safetensors",
        }[what]
        shutil.move(folder / name, outside / "f")
        (folder / name).symlink_to(outside / ("missing" if what == "dangling" else "f"))
    refused(latentforge.load, folder, match="leads outside the folder")


def test_hub_cache_links_into_its_blobs_load(model, tmp_path):
    """The Hugging Face cache keeps snapshot files as links to ../../blobs/<hash>: a documented success."""
    repo = tmp_path / "models--test--tiny"
    snap = repo / "snapshots" / "0123abc"
    shutil.copytree(model["folder"], snap)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in snap.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(f, blob)
        f.symlink_to(Path("../" * len(f.relative_to(repo).parts[1:-1]) + "../blobs") / blob.name)
    kind, pipe = bounded(latentforge.load, snap)
    assert kind == "ok", str(pipe)
    assert pipe.family.name == "sd1"


CONFIGS = [
    ("unet", "layers_per_block", 100000, "'layers_per_block' is 100000, above latentforge's limit of 16"),
    ("unet", "block_out_channels", [0, 64, 64, 64], "'block_out_channels'[0] is 0; it must be at least 1"),
    ("unet", "block_out_channels", [-32, 64, 64, 64], "'block_out_channels'[0] is -32"),
    ("unet", "block_out_channels", "abc", "'block_out_channels' is 'abc'; it must be a list"),
    ("unet", "block_out_channels", [32] * 100, "the length of 'block_out_channels' (levels) is 100"),
    ("unet", "block_out_channels", [32, 48, 64, 64], "'block_out_channels'[1] = 48 is not a multiple"),
    ("unet", "attention_head_dim", 0, "'attention_head_dim'[0] is 0"),
    ("unet", "norm_num_groups", 0, "'norm_num_groups' is 0"),
    ("unet", "norm_num_groups", 7, "not a multiple of 7 norm groups"),
    ("unet", "transformer_layers_per_block", 10**9, "above latentforge's limit of 64"),
    ("unet", "down_block_types", ["DownBlock2D"] * 3, "'down_block_types' has 3 entries for 4 levels"),
    ("unet", "cross_attention_dim", 1.5, "'cross_attention_dim' is 1.5; it must be an integer"),
    ("unet", "in_channels", 10**12, "'in_channels' is 1000000000000, above latentforge's limit of 1024"),
    ("unet", "block_out_channels", None, "'block_out_channels' is None"),
    ("unet", "layers_per_block", True, "'layers_per_block' is True; it must be an integer"),
    ("vae", "latent_channels", 0, "'latent_channels' is 0"),
    ("vae", "layers_per_block", -1, "'layers_per_block' is -1"),
    ("text_encoder", "num_hidden_layers", 100000, "'num_hidden_layers' is 100000, above latentforge's limit of 256"),
    ("text_encoder", "hidden_size", 0, "'hidden_size' is 0"),
    ("text_encoder", "num_attention_heads", 3, "not a multiple of 3 heads"),
    ("text_encoder", "hidden_act", "relu", "text encoders ['text_encoder:relu']"),  # detection names it
    ("text_encoder", "layer_norm_eps", -1, "layer_norm_eps is -1"),
    ("scheduler", "prediction_type", 5, "prediction_type is 5"),
]


@pytest.mark.parametrize(("component", "key", "value", "message"), CONFIGS)
def test_absurd_config_values_are_refused_by_key(model, tmp_path, component, key, value, message):
    folder = _copy(model, tmp_path)
    path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    err = refused(inspect_checkpoint, folder, match=message)  # inspect reads configs, not weights
    if not isinstance(err, DetectionError):
        assert str(path) in str(err) and "\n" not in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "holds a JSON list, not an object"), ("{", "is not valid JSON"), ("[" * 10**5, "not valid JSON")],
)
def test_config_files_that_are_not_json_objects(model, tmp_path, text, message, capsys):
    folder = _copy(model, tmp_path)
    (folder / "unet" / "config.json").write_text(text)
    refused(latentforge.load, folder, match=message)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("vocab.json", "[1, 2]", "is not a CLIP vocabulary"),
        ("vocab.json", '{"<|startoftext|>": 0, "<|endoftext|>": 1, "a": "x"}', "is not a CLIP vocabulary"),
        ("vocab.json", '{"<|startoftext|>": 0, "<|endoftext|>": 99999}', "token ids reach 99999 but text encoder"),
        ("merges.txt", "#version: 0.2\na b c\n", "merge 1 is not two tokens"),
        ("vocab.json", "\udcff", "cannot read the tokenizer files"),
    ],
)
def test_hostile_tokenizer_files(model, tmp_path, name, text, message):
    folder = _copy(model, tmp_path)
    (folder / "tokenizer" / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(latentforge.load, folder, match=message)


def test_single_file_with_a_tiny_token_embedding_is_refused(model, tmp_path):
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    path = _mutated(model, tmp_path, lambda sd: sd.__setitem__(key, sd[key][:1000].clone()))
    refused(latentforge.load, path, match="token ids reach 49407 but text encoder clip-l has only 1000")
