"""Hostile model files: every case ends quickly, in bounded memory, in a documented error or success.

Safetensors headers are generated (hypothesis) and judged against the reference library
(``safetensors.safe_open``, the format's own implementation): whatever it refuses we refuse, whatever we
accept it accepts with the same bytes, and where we are stricter (duplicate names, dtypes torch lacks)
the message says so. Hand-made cases follow the format description ("Format" in the safetensors README:
u64 header length, JSON header, byte buffer) and check the error names the tensor and the problem.
Single files are tiny real checkpoints (``tests/tiny.py``) with key names, shapes, dtypes or bytes
changed; folders are in test_fuzz_folders.py; helpers in hostile.py.
"""

from __future__ import annotations

import functools
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import latentforge
from hostile import bounded, make_model, mutated, one, refused, write_st
from latentforge.cli import main
from latentforge.io.tensorfile import CheckpointError, SafetensorsFile, TorchFile
from latentforge.loading import inspect_checkpoint

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


HEADERS = {
    "negative offset": (one(offsets=(-8, 0)), b"\0" * 8, "data offsets [-8, 0]; they must be two non-negative"),
    "reversed offsets": (one(offsets=(8, 0)), b"\0" * 8, "reversed data offsets [8, 0)"),
    "offsets past the data": (one(offsets=(0, 8)), b"\0" * 4, "truncated"),
    "shape disagrees with bytes": (one(shape=(3,)), b"\0" * 8, "shape [3] of F32 (12 bytes) but data offsets [0, 8)"),
    "huge shape": (one(shape=(2**40, 2**40)), b"\0" * 8, "more than 2^64 bytes"),
    "negative shape": (one(shape=(-2,)), b"\0" * 8, "a shape is a list of non-negative integers"),
    "float offsets": (one(offsets=(0.0, 8.0)), b"\0" * 8, "must be two non-negative integers"),
    "unknown dtype": (one(dtype="F8_E8M0"), b"\0" * 8, "unknown or unsupported dtype 'F8_E8M0'"),
    "header is a list": ([1, 2], b"", "the header is a JSON list, not an object"),
    "entry is a string": ({"x": "F32"}, b"", "the entry of tensor 'x' is a JSON str"),
    "entry lacks offsets": ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "has no data_offsets"),
    "metadata not str->str": ({"__metadata__": {"a": 1}, **one()}, b"\0" * 8, "'__metadata__' must map strings"),
    "gap before a tensor": (one(offsets=(4, 12)), b"\0" * 12, "bytes [0, 4) of the data section"),
    "bytes after the last tensor": (one(), b"\0" * 12, "the tensors cover only the first 8"),
    "overlap": (
        {**one(), "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
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
    refused(TorchFile, tmp_path / "loop.ckpt", match="nests its weights more than 8 deep")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    refused(TorchFile, tmp_path / "list.ckpt", match="holds a list")


# --- single-file checkpoints: tiny real ones, mutated -----------------------------------------------


# --- single-file checkpoints: tiny real ones, mutated -----------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fuzz_model"))


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
    path = mutated(model, tmp_path, change)
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
    path = mutated(model, tmp_path, lambda sd: sd.__setitem__(key, sd[key].to(torch.int8)))
    refused(latentforge.load, path, match="out.2.weight")


def test_cli_exit_code_and_one_line_in_a_real_process(tmp_path):
    import subprocess
    import sys

    path = write_st(tmp_path / "x.safetensors", one(offsets=(8, 0)), b"\0" * 8)
    run = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "reversed data offsets [8, 0)" in run.stderr, run.stderr


def test_single_file_with_a_tiny_token_embedding_is_refused(model, tmp_path):
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    path = mutated(model, tmp_path, lambda sd: sd.__setitem__(key, sd[key][:1000].clone()))
    refused(latentforge.load, path, match="token ids reach 49407 but text encoder clip-l has only 1000")


def test_hostile_standalone_vae_file(model, tmp_path):
    sd = {k.removeprefix("first_stage_model."): v for k, v in load_file(model["single"]).items() if "first_stage" in k}
    sd["encoder.down.99999.block.0.conv1.weight"] = sd.pop("encoder.down.0.block.0.conv1.weight")
    save_file(sd, tmp_path / "v.safetensors")
    err = refused(functools.partial(latentforge.load, vae=tmp_path / "v.safetensors"), model["single"])
    assert str(tmp_path / "v.safetensors") in str(err) and "limit of" in str(err)


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("model:\n  params:\n    parameterization: x0\n", "parameterization: unknown prediction type 'x0'"),
        ("    num_heads: " + "9" * 5000 + "\n", "num_heads is '99999999"),
        ("    num_heads: 100000\n", "UNet num_heads is 100000, above latentforge's limit of 1024"),
        ("    num_head_channels: 7\n", "are not multiples of 7 channels per head"),
        ("#" * (2**20 + 1), "bytes long; an original-format model config is a few KB"),
    ],
)
def test_hostile_sidecar_yaml(model, tmp_path, yaml, message):
    path = tmp_path / "m.safetensors"
    path.write_bytes(model["single"].read_bytes())
    path.with_suffix(".yaml").write_text(yaml)
    refused(latentforge.load, path, match=message)


def test_hostile_prediction_metadata(model, tmp_path):
    sd = load_file(model["single"])
    save_file(sd, tmp_path / "m.safetensors", metadata={"latentforge.prediction": "x0" * 1000})
    err = refused(latentforge.load, tmp_path / "m.safetensors", match="metadata latentforge.prediction")
    assert len(str(err)) < 400


# --- ESRGAN-family upscaler files: sizes come from shapes too ---------------------------------------


def _compact(last: int, features: int) -> dict[str, torch.Tensor]:
    return {
        "body.0.weight": torch.zeros(features, 3, 3, 3),
        "body.1.weight": torch.zeros(features),
        f"body.{last}.weight": torch.zeros(48, features, 3, 3),
    }


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (_compact(999_998, 8), "compact conv count is 499998, above latentforge's limit of 256"),
        # 19 convs of 2048 features: 2048*3*9+2048 + 2048 + 19*(2048*2048*9+2048 + 2048) + 48*2048*9+48
        # = 718247984 parameters (2.9 GB) claimed by a 3.7 MB file
        (_compact(40, 2048), "describe a SRVGGNetCompact of 718247984 parameters"),
        ({"conv_first.weight": torch.zeros(64), "body.0.rdb1.conv1.weight": torch.zeros(2)}, "form no upscaler"),
    ],
)
def test_hostile_upscaler_files(tmp_path, state, message):
    from latentforge.models.esrgan import load_upscaler

    save_file(state, tmp_path / "u.safetensors")
    refused(load_upscaler, tmp_path / "u.safetensors", match=message)


# --- regressions: hostile files that escaped the shared readers -------------------------------------


def test_empty_tensor_whose_sizes_overflow_strides_is_refused_by_name(tmp_path):
    # zero elements (so zero bytes, matching its offsets), but torch cannot compute its strides
    path = write_st(tmp_path / "x.safetensors", one(shape=(0, 2**62, 2**62), offsets=(0, 0)))
    err = refused(SafetensorsFile, path, match="whose sizes multiply past 2^63")
    assert str(path) in str(err) and "'x'" in str(err)


def test_symlink_loop_is_reported_as_a_loop_not_as_missing(tmp_path):
    import os

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    err = refused(latentforge.load, a, match="Too many levels of symbolic links")
    assert str(a) in str(err) and "does not exist" not in str(err)


def _legacy_claiming(tmp_path: Path, numel: int) -> Path:
    """A legacy-format (pre-zip) torch.save whose pickle says its one storage holds ``numel`` floats."""
    torch.save({"state_dict": {"w": torch.zeros(4)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    raw = bytearray((tmp_path / "legacy.pt").read_bytes())
    at = raw.find(b"K\x04", raw.find(b"X\x03\x00\x00\x00cpu"))  # numel 4 in the persistent id
    raw[at : at + 2] = b"J" + struct.pack("<i", numel)
    (tmp_path / "big.pt").write_bytes(bytes(raw))
    return tmp_path / "big.pt"


def test_legacy_pickle_claiming_gigabytes_is_refused_before_allocating(tmp_path):
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, tmp_path / "ok.pt", _use_new_zipfile_serialization=False)
    assert TorchFile(tmp_path / "ok.pt").read("w").tolist() == [0, 1, 2, 3]  # the legacy format still loads
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()  # an OrderedDict
    torch.save(sd, tmp_path / "module.pt", _use_new_zipfile_serialization=False)
    assert all(torch.equal(TorchFile(tmp_path / "module.pt").read(k), v) for k, v in sd.items())
    big = _legacy_claiming(tmp_path, 2**31 - 1)  # 8 GB of float32 claimed by a 400-byte file
    err = refused(TorchFile, big, match="its pickle declares tensors of 8589934588 bytes")
    assert str(big) in str(err)
    refused(latentforge.load, big, match="declares tensors of")
    # a pickle length field (BINUNICODE) claiming 4 GB: the reads are bounded by the file
    (tmp_path / "len.pt").write_bytes(b"\x80\x02X" + struct.pack("<I", 2**32 - 1) + b"abc")
    refused(TorchFile, tmp_path / "len.pt", match="could not be read as a PyTorch checkpoint")


def test_plain_pickle_with_reduce_is_refused_naming_the_callable(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    err = refused(latentforge.load, tmp_path / "evil.ckpt", match="needs unsafe unpickling")
    assert "system" in str(err) and "Weights only load failed" not in str(err)
    assert not (tmp_path / "ran").exists()


def test_pickles_too_long_for_the_pure_python_unpickler_are_refused_quickly(tmp_path):
    from latentforge.io.tensorfile import MAX_PICKLE_BYTES

    # 1.5 million memo lookups: not written by torch.save; torch.load's unpickler would take about 5 s
    (tmp_path / "ops.pt").write_bytes(b"\x80\x02]q\x00" + b"h\x00" * 1_500_000 + b".")
    refused(TorchFile, tmp_path / "ops.pt", match="is a pickle but not a PyTorch checkpoint")
    (tmp_path / "long.pt").write_bytes(b"\x80\x02]q\x00" + b"h\x00" * MAX_PICKLE_BYTES + b".")
    refused(TorchFile, tmp_path / "long.pt", match="its pickle (the description of its tensors) is longer than")
    # the same opcodes as the data.pkl of a zip checkpoint, past the limit
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.zeros(1)}, good)
    ops = b"\x80\x02]q\x00" + b"h\x00" * (MAX_PICKLE_BYTES // 2) + b"."
    big = _rezip(good, tmp_path / "long.ckpt", change=lambda n, d: ops if n.endswith("data.pkl") else d)
    err = refused(TorchFile, big, match="MAX_PICKLE_BYTES")
    assert f"is {len(ops)} bytes long" in str(err) and str(big) in str(err)
