"""Hostile files found by an audit: EXIF in JPEG/WebP read by a bounded parser (never as a file name),
sidecar YAML scanned in linear time, every legacy pickle bounded before torch unpickles it, rank-0 LoRA
factors, non-finite ComfyUI steps and mistyped model fields refused in one line, escaped ``inspect``
output, and safetensors headers holding JSON the safetensors library refuses."""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import re
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import piexif
import piexif.helper
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfygraph import comfy_png, comfy_txt2img
from hostile import refused, write_st
from latentforge.adapters.lora import LoraError, read_lora
from latentforge.cli import main
from latentforge.demo import bundled_model_path
from latentforge.io.images import exif_user_comment, read_user_comment, save_image, user_comment_from_exif
from latentforge.io.tensorfile import MAX_PICKLE_BYTES, CheckpointError, SafetensorsFile, TorchFile
from latentforge.pipelines.metadata import model_differences, read_png_metadata, request_from_image
from latentforge.pipelines.request import RequestError

TEXT = "a red circle\nNegative prompt: blue\nSteps: 12, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 64x64"


@pytest.fixture(scope="module")
def demo():
    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    return str(path)


# ---- 1. EXIF UserComment (JPEG/WebP) -------------------------------------------------------------


def _tiff(order: str, ifd0: list[tuple[int, int, int, bytes]], exif: list[tuple[int, int, int, bytes]]) -> bytes:
    """A TIFF block: IFD0 at 8, then the Exif IFD, then the out-of-line values. Entries are (tag, type,
    count, value bytes); the pointer tag's value is filled in when its bytes are empty."""
    e = "<" if order == "II" else ">"
    head = (b"II*\0" if order == "II" else b"MM\0*") + struct.pack(e + "I", 8)
    exif_at = 8 + 2 + 12 * len(ifd0) + 4
    data_at = exif_at + 2 + 12 * len(exif) + 4
    tail = b""

    def table(entries):
        nonlocal tail
        out = struct.pack(e + "H", len(entries))
        for tag, kind, count, value in entries:
            if tag == 0x8769 and not value:
                value = struct.pack(e + "I", exif_at)
            if len(value) <= 4:
                out += struct.pack(e + "HHI", tag, kind, count) + value.ljust(4, b"\0")
            else:
                out += struct.pack(e + "HHII", tag, kind, count, data_at + len(tail))
                tail += value
        return out + b"\0\0\0\0"

    return head + table(ifd0) + table(exif) + tail


def _comment(text: str = TEXT) -> bytes:
    return b"UNICODE\0" + text.encode("utf-16-be")


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("kind", [1, 2, 7])  # BYTE (Pillow), ASCII, UNDEFINED (piexif, A1111)
def test_user_comment_read_from_either_byte_order_and_type(order, kind):
    raw = _tiff(order, [(0x8769, 4, 1, b"")], [(0x9286, kind, len(_comment()), _comment())])
    assert user_comment_from_exif(raw) == TEXT
    assert user_comment_from_exif(b"Exif\0\0" + raw) == TEXT
    ascii_ = b"ASCII\0\0\0" + b"Steps: 3"
    assert (
        user_comment_from_exif(_tiff(order, [(0x8769, 13, 1, b"")], [(0x9286, 7, len(ascii_), ascii_)])) == "Steps: 3"
    )


def test_user_comment_agrees_with_piexif_on_what_a1111_writes():
    for text in ["", "x", TEXT, "猫 \U0001f600 " * 500, "\0\x1b[2J"]:
        raw = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, "unicode")}})
        assert (
            user_comment_from_exif(raw)
            == text
            == piexif.helper.UserComment.load(piexif.load(raw)["Exif"][piexif.ExifIFD.UserComment])
        )
        assert user_comment_from_exif(exif_user_comment(text)) == text


def test_exif_bytes_are_never_taken_for_a_file_name(tmp_path):
    """piexif.load opens its argument as a path when it has no TIFF header: a WebP whose EXIF was the
    name of another image showed that image's prompt; /dev/stdin hung."""
    other = save_image(_with(Image.new("RGB", (8, 8)), "private prompt"), tmp_path / "other.jpg")
    assert read_png_metadata(other)["parameters"] == "private prompt"
    for name in (str(other).encode(), b"/dev/stdin", b"/dev/zero", b"/etc/hostname"):
        Image.new("RGB", (8, 8)).save(tmp_path / "x.webp", exif=name)
        with Image.open(tmp_path / "x.webp") as im:
            assert im.info["exif"] == name
            assert read_user_comment(im) is None
        assert read_png_metadata(tmp_path / "x.webp")["parameters"] is None
        with pytest.raises(RequestError, match="carries no generation parameters"):
            request_from_image(tmp_path / "x.webp")


def _with(image: Image.Image, text: str) -> Image.Image:
    image.info["parameters"] = text
    return image


@pytest.mark.filterwarnings("ignore:Tag data larger than file")  # Pillow's own EXIF look on open
def test_exif_counts_and_offsets_are_checked_before_use(tmp_path):
    """The audit's 795-byte JPEG declares 0x66000001 values for the Exif pointer: piexif allocated ~2 GB."""
    good = _tiff("MM", [(0x8769, 4, 1, b"")], [(0x9286, 7, len(_comment()), _comment())])
    bomb = bytearray(good)
    bomb[8 + 2 + 4 : 8 + 2 + 8] = struct.pack(">I", 0x66000001)  # the pointer's count
    cases = {
        "bomb": bytes(bomb),
        "comment past the end": _tiff("II", [(0x8769, 4, 1, b"")], [(0x9286, 7, 2**31, b"\0\0\0\0")]),
        "pointer past the end": _tiff("II", [(0x8769, 4, 1, struct.pack("<I", 2**31))], []),
        "ifd past the end": b"II*\0" + struct.pack("<I", 2**32 - 1),
        "ifd0 claims 65535 entries": b"MM\0*\0\0\0\x08\xff\xff" + b"\0" * 64,
        "exif ifd is ifd0": _tiff("II", [(0x8769, 4, 1, struct.pack("<I", 8))], []),
        "pointer is text": _tiff("II", [(0x8769, 2, 4, b"abc\0")], []),
        "no pointer": _tiff("II", [(0x0112, 3, 1, b"\1\0")], []),
        "truncated": good[:20],
        "empty": b"",
        "not tiff": b"Exif\0\0<?xml",
    }
    tracemalloc.start()
    try:
        for name, raw in cases.items():
            assert user_comment_from_exif(raw) is None, name
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    # no known encoding prefix: A1111 reads the bytes as UTF-8 (piexif refuses them, A1111 falls back)
    undefined = _tiff("II", [(0x8769, 4, 1, b"")], [(0x9286, 7, 12, b"\0" * 8 + b"abcd")])
    assert user_comment_from_exif(undefined) == "abcd"
    assert user_comment_from_exif(_tiff("II", [(0x8769, 4, 1, b"")], [(0x9286, 7, 4, b"UNIC")])) == "UNIC"
    Image.new("RGB", (8, 8)).save(tmp_path / "bomb.jpg", exif=b"Exif\0\0" + bytes(bomb))
    assert read_png_metadata(tmp_path / "bomb.jpg")["parameters"] is None


def test_mutated_exif_blocks_end_quickly_in_text_or_none():
    base = exif_user_comment("hello world, Steps: 20")
    rng = random.Random(1)
    start = time.perf_counter()
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[: rng.randrange(len(b))]
        assert isinstance(user_comment_from_exif(bytes(b)), (str, type(None)))
    assert time.perf_counter() - start < 10


# ---- 2. sidecar YAML -----------------------------------------------------------------------------


def test_hostile_sidecar_yaml_is_scanned_in_linear_time(tmp_path):
    """``^\\s*name:`` with re.M backtracked across newlines: 40,000 newlines took ~10 s and the 1 MiB
    allowed would take hours. Run in a child process so that the old behaviour fails, not hangs."""
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: v\n    num_heads: 8\n")
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from latentforge.families.detect import read_sidecar
        folder = Path(sys.argv[1])
        got = read_sidecar(folder / "m.safetensors")
        assert (got.prediction, got.num_heads, got.head_channels) == ("v", 8, None), got
        n = 2**20
        names = ("num_heads:" + " " * 200 + "x\\n") * (n // 212)
        for text in ["\\n" * n, " \\n" * (n // 2), "\\t\\n\\r\\n" * (n // 4), " " * n, names]:
            (folder / "h.yaml").write_text(text[:n])
            start = time.perf_counter()
            got = read_sidecar(folder / "h.safetensors")
            assert time.perf_counter() - start < 2, (text[:20], time.perf_counter() - start)
            assert (got.prediction, got.num_heads, got.head_channels) == (None, None, None)
        """
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ---- 3. the fifth pickle of a legacy checkpoint -------------------------------------------------------


def _legacy_with_keys(tmp_path: Path, keys_pickle) -> Path:
    """A legacy (pre-zip) torch.save whose fifth pickle (the storage keys) is ``keys_pickle(key)``, ``key``
    the BINUNICODE of the one storage's name."""
    from latentforge.io.tensorfile import _Scanner

    buf = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    f = io.BytesIO(raw)
    for _ in range(4):
        _Scanner(f).load()
    pos = f.tell()
    (name,) = pickle.load(f)
    key = b"X" + struct.pack("<I", len(name.encode())) + name.encode()
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(raw[:pos] + keys_pickle(key) + raw[f.tell() :])
    return path


def test_legacy_storage_keys_pickle_is_bounded_before_torch_unpickles_it(tmp_path):
    ok = _legacy_with_keys(tmp_path, lambda key: b"\x80\x02]" + key + b"a.")
    assert TorchFile(ok).read("a").tolist() == [0.0, 0.0]
    # 8 MB of appends: torch.load's pure-Python unpickler took ~5 s before failing on it
    long = _legacy_with_keys(tmp_path, lambda key: b"\x80\x02]" + b"Na" * MAX_PICKLE_BYTES + key + b"a.")
    err = refused(TorchFile, long, match="its pickle (the description of its tensors) is longer than")
    assert str(long) in str(err)
    odd = _legacy_with_keys(tmp_path, lambda key: b"\x80\x02]" + b"Na" * 1000 + key + b"a.")
    refused(
        TorchFile,
        odd,
        match="its last pickle must list the names of its storages, but it is a list holding a value of type NoneType",
    )
    not_list = _legacy_with_keys(tmp_path, lambda key: b"\x80\x02K\x05.")
    refused(TorchFile, not_list, match="must list the names of its storages, but it is of type int")


# ---- 4a. rank-0 LoRA / LoHa --------------------------------------------------------------------------

MODULE = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"  # a [32, 128] linear of the demo model
RANK0 = {
    "lora": {"lora_down.weight": (0, 128), "lora_up.weight": (32, 0)},
    "loha": {"hada_w1_a": (32, 0), "hada_w1_b": (0, 128), "hada_w2_a": (32, 0), "hada_w2_b": (0, 128)},
}


def _rank0(folder: Path, kind: str) -> Path:
    sd = {f"{MODULE}.{k}": torch.zeros(s) for k, s in RANK0[kind].items()}
    sd[f"{MODULE}.alpha"] = torch.tensor(8.0)
    folder.mkdir(exist_ok=True)
    save_file(sd, folder / f"rank0{kind}.safetensors")
    return folder / f"rank0{kind}.safetensors"


@pytest.mark.parametrize("kind", list(RANK0))
def test_rank0_factors_are_refused_naming_the_module(tmp_path, kind):
    path = _rank0(tmp_path, kind)
    with pytest.raises(LoraError) as e:
        read_lora(path)
    assert str(path) in str(e.value) and MODULE in str(e.value) and "rank 0" in str(e.value)


@pytest.mark.parametrize("kind", list(RANK0))
def test_rank0_lora_in_the_cli_is_one_line(demo, tmp_path, kind, capsys):
    """These ended in ZeroDivisionError tracebacks (alpha / rank)."""
    path = _rank0(tmp_path / "loras", kind)
    assert main(["inspect", str(path), "-m", demo]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentforge: error: ") and err.count("\n") == 1 and "rank 0" in err
    args = ["txt2img", f"x <lora:{path.stem}:1>", "-m", demo, "--lora-dir", str(path.parent), "--steps", "1", "-q"]
    assert main([*args, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentforge: error: ") and err.count("\n") == 1 and "rank 0" in err
    assert not (tmp_path / "o.png").exists()


# ---- 4b/4c. --from: ComfyUI steps, latentforge's model record -------------------------------------------


def _comfy(tmp_path: Path, steps) -> Path:
    graph = comfy_txt2img(
        ckpt="m.safetensors", positive="a", negative="", seed=1, steps=steps, cfg=7, width=64, height=64
    )
    return comfy_png(tmp_path / "comfy.png", graph)


@pytest.mark.parametrize("steps", [math.inf, -math.inf, math.nan, 12.5])
def test_comfyui_steps_that_are_not_whole_numbers_are_refused(tmp_path, steps):
    path = _comfy(tmp_path, steps)
    with pytest.raises(RequestError) as e:
        request_from_image(path)
    assert str(e.value).startswith(f"{path}: ComfyUI graph: KSampler input 'steps': steps must be a whole number")
    assert "cannot be reproduced from this graph" in str(e.value)


def test_comfyui_whole_float_steps_still_read(tmp_path):
    assert request_from_image(_comfy(tmp_path, 20.0))[0].steps == 20


def test_comfyui_infinite_steps_in_the_cli_is_one_line(demo, tmp_path, capsys):
    path = _comfy(tmp_path, math.inf)
    assert b"Infinity" in path.read_bytes()  # json.dumps writes it; json.loads reads it back
    assert main(["txt2img", "--from", str(path), "-m", demo, "-q", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentforge: error: ") and err.count("\n") == 1 and "'steps'" in err


def _record_png(tmp_path: Path, model) -> Path:
    record = {"latentforge": 1, "mode": "txt2img", "batch_index": 0, "request": {"prompt": "a", "steps": 2}}
    info = PngImagePlugin.PngInfo()
    info.add_text("latentforge", json.dumps({**record, "model": model}))
    Image.new("RGB", (8, 8)).save(tmp_path / "lf.png", pnginfo=info)
    return tmp_path / "lf.png"


@pytest.mark.parametrize("model", [{"hash": 12345}, {"name": 5}, {"hash": ["a"], "name": "m"}, {"name": {"x": 1}}])
def test_record_model_fields_that_are_not_text_are_refused_before_loading(tmp_path, model):
    path = _record_png(tmp_path, model)
    with pytest.raises(
        RequestError, match=re.escape(f"{path}: latentforge record: model.") + "(hash|name) must be text"
    ):
        request_from_image(path)


def test_record_model_fields_as_written_still_read(tmp_path):
    meta = request_from_image(_record_png(tmp_path, {"name": "m", "hash": None}))[1]
    assert meta["model"] == {"name": "m", "hash": None}


def test_model_differences_treats_non_text_fields_as_absent():
    """The AttributeError (int.lower) came after the model had loaded."""
    pipe = SimpleNamespace(cached=lambda name, make: {"Model hash": "abcd1234", "Model": "mine"})
    assert model_differences(pipe, {"model": {"hash": 12345, "name": 5}}) == []
    assert model_differences(pipe, {"model": [1]}) == []
    (line,) = model_differences(pipe, {"model": {"hash": "ffff0000", "name": 5}})
    assert "model ? [ffff0000], not the loaded mine [abcd1234]" in line


# ---- 5. inspect output and safetensors headers --------------------------------------------------------

EVIL = ["evil\x1b]0;title\x07", "csi\x9b2J", "lone\ud800", "bidi\u202ename"]


def test_inspect_escapes_names_from_the_file(demo, tmp_path, monkeypatch):
    """Names from a pickle went to the terminal raw (ESC, C1 CSI) or crashed a strict UTF-8 stdout
    (a lone surrogate, which a pickle can hold)."""
    sd = load_file(demo)
    sd.update({name: torch.zeros(1) for name in EVIL})
    torch.save(sd, tmp_path / "evil.ckpt")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["inspect", str(tmp_path / "evil.ckpt")]) == 0
    out.flush()
    text = out.buffer.getvalue().decode("utf-8")
    assert "evil\\x1b]0;title\\x07" in text and "csi\\x9b2J" in text and "lone\\ud800" in text
    assert "bidi\\u202ename" in text
    assert not any(c in text for c in "\x1b\x07\x9b\u202e")


def _header(name: str = "a", extra: str = "", meta: str = "") -> bytes:
    entry = '"dtype":"F32","shape":[1],"data_offsets":[0,4]'
    return ("{" + (f'"__metadata__":{{{meta}}},' if meta else "") + f'"{name}":{{{entry}{extra}}}}}').encode()


REFUSED_BY_THE_LIBRARY = {
    "lone high surrogate in a name": (_header(name="a\\ud800"), "escape \\ud800"),
    "lone low surrogate in a name": (_header(name="a\\udc00"), "escape \\udc00"),
    "surrogate in metadata": (_header(meta='"k":"v\\uDBFF"'), "escape \\uDBFF"),
    "surrogate in a metadata key": (_header(meta='"k\\ud800":"v"'), "escape \\ud800"),
    "surrogate in an extra field": (_header(extra=',"x":"\\ud800"'), "half of a UTF-16 surrogate pair"),
    "high then escaped backslash then low": (_header(name="\\ud800\\\\\\udc00"), "escape \\ud800"),
    "NaN in an extra field": (_header(extra=',"x":NaN'), "NaN is not a JSON value"),
    "Infinity in an extra field": (_header(extra=',"x":[-Infinity]'), "-Infinity is not a JSON value"),
    "number out of range": (_header(extra=',"x":1e400'), "number 1e400 is out of range"),
    "NaN in metadata": (_header(meta='"k":NaN'), "NaN is not a JSON value"),
    "nested 128 deep": (_header(extra=',"x":' + "[" * 126 + "]" * 126), "nested more than 127 deep"),
    "objects nested 128 deep": (_header(extra=',"x":' + '{"y":' * 126 + "1" + "}" * 126), "nested more than"),
}
READ_BY_THE_LIBRARY = {
    "surrogate pair": _header(name="a\\ud83d\\ude00"),
    "escaped backslash before u": _header(name="a\\\\ud800"),
    "nested 127 deep": _header(extra=',"x":' + "[" * 125 + "]" * 125),
    "big integer": _header(extra=',"x":123456789012345678901234567890'),
    "small float": _header(extra=',"x":1e-400'),
    "control character escape": _header(name="a\\u001b[31m"),
}


def _library(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", list(REFUSED_BY_THE_LIBRARY))
def test_header_json_the_library_refuses_is_refused(tmp_path, name):
    raw, message = REFUSED_BY_THE_LIBRARY[name]
    path = write_st(tmp_path / "h.safetensors", raw, b"\0" * 4)
    assert not _library(path)
    err = refused(SafetensorsFile, path, match=message)
    assert isinstance(err, CheckpointError) and str(path) in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("name", list(READ_BY_THE_LIBRARY))
def test_header_json_the_library_reads_is_read(tmp_path, name):
    path = write_st(tmp_path / "h.safetensors", READ_BY_THE_LIBRARY[name], b"\0" * 4)
    assert _library(path)
    f = SafetensorsFile(path)
    try:
        with safe_open(str(path), "pt") as ref:
            assert f.keys() == list(ref.keys())
    finally:
        f.close()
