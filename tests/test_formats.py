"""Metadata where users keep it: JPEG/WebP (A1111's EXIF UserComment), ComfyUI's PNG graph, and --from
naming what it cannot reproduce."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from comfygraph import DEFAULT_GRAPH, comfy_png, comfy_txt2img
from latentforge.cli import main
from latentforge.demo import bundled_model_path
from latentforge.io.images import save_image
from latentforge.pipelines.metadata import read_png_metadata, request_from_image
from latentforge.pipelines.request import RequestError

TEXT = 'a "cat", 猫\nNegative prompt: dog\nSteps: 12, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 64x64'

# ComfyUI's default txt2img graph as ComfyUI writes it into PNGs
COMFY = comfy_txt2img(**DEFAULT_GRAPH)


def _image():
    image = Image.fromarray(np.full((16, 16, 3), 120, np.uint8))
    image.info["parameters"] = TEXT
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_parameters_survive_each_format(tmp_path, suffix):
    path = save_image(_image(), tmp_path / f"out{suffix}")
    assert read_png_metadata(path)["parameters"] == TEXT
    assert request_from_image(path)[0].prompt == 'a "cat", 猫'


def test_a1111_exif_built_independently_is_read(tmp_path):
    """EXIF as A1111 writes JPEGs: UserComment (0x9286) in the Exif IFD (0x8769), 'UNICODE\\0' then
    UTF-16 big-endian; built here with Pillow, not with the library latentforge writes it with."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + TEXT.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.jpg", exif=exif.tobytes())
    req, info = request_from_image(tmp_path / "a1111.jpg")
    assert (req.steps, req.seed, req.cfg_scale, req.negative_prompt) == (12, 42, 6.0, "dog")
    assert info["source"] == "infotext"


def test_comfyui_graph_is_read(tmp_path):
    req, meta = request_from_image(comfy_png(tmp_path / "comfy.png", COMFY, workflow={"nodes": [], "links": []}))
    assert (req.prompt, req.negative_prompt) == ("beautiful scenery", "text, watermark")
    assert (req.seed, req.steps, req.cfg_scale, req.sampler, req.schedule) == (
        156680208700286,
        20,
        8.0,
        "euler",
        "normal",
    )
    assert (req.width, req.height, req.batch_size) == (512, 768, 1)
    assert req.sgm_noise_multiplier and req.quantize_timesteps  # ComfyUI's conventions
    assert meta["model"]["name"] == "v1-5-pruned-emaonly.safetensors" and meta["source"] == "comfyui"
    req.validate()


def _with_seed(seed, **nodes) -> dict:
    graph = {**copy.deepcopy(COMFY), **nodes}
    graph["3"]["inputs"]["seed"] = seed
    return graph


@pytest.mark.parametrize(
    "seed, nodes, words",
    [
        ("156680208700286", {}, "a seed is a whole number from 0 to 2^64 - 1 in ComfyUI, got '156680208700286'"),
        (1.5, {}, "got 1.5"),
        (True, {}, "got True"),
        (-3, {}, "got -3"),
        (2**64, {}, "got 18446744073709551616"),
        (None, {}, "the sampler has no seed"),
        (["6", 0], {}, "links to node '6' (CLIPTextEncode), which is not a seed"),  # a prompt text node
        (["99", 0], {}, "links to node '99', which is not in the graph"),
        ([], {}, "got []"),
        (["20", 0], {"20": {"class_type": "PrimitiveInt", "inputs": {"value": "x"}}}, "node '20' (PrimitiveInt)"),
        (["20", 0], {"20": {"class_type": "Seed", "inputs": {"seed": ["21", 0]}},
                     "21": {"class_type": "Seed", "inputs": {"seed": ["20", 0]}}}, "go round in a circle"),
    ],
)  # fmt: skip
def test_comfyui_seeds_that_cannot_be_read_are_errors(tmp_path, seed, nodes, words):
    """These used to leave the seed at -1: --from silently made an image from a random seed. ComfyUI's
    graph holds the seed that ran (control_after_generate is an editor widget, not part of it)."""
    path = comfy_png(tmp_path / "c.png", _with_seed(seed, **nodes))
    with pytest.raises(RequestError) as e:
        request_from_image(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ComfyUI graph: ") and words in message, message
    assert "cannot be reproduced from this graph (run without --from)" in message


def test_comfyui_seeds_passed_on_by_primitive_and_seed_nodes(tmp_path):
    primitive = {"20": {"class_type": "PrimitiveInt", "inputs": {"value": 77}}}
    assert request_from_image(comfy_png(tmp_path / "a.png", _with_seed(["20", 0], **primitive)))[0].seed == 77
    chain = {"20": {"class_type": "Seed (rgthree)", "inputs": {"seed": ["21", 0]}},
             "21": {"class_type": "Int Literal", "inputs": {"int": 2**64 - 1}}}  # fmt: skip
    assert request_from_image(comfy_png(tmp_path / "b.png", _with_seed(["20", 0], **chain)))[0].seed == 2**64 - 1
    advanced = copy.deepcopy(COMFY)
    inputs = advanced["3"]["inputs"]
    advanced["3"] = {"class_type": "KSamplerAdvanced", "inputs": {**inputs, "noise_seed": 0}}
    del advanced["3"]["inputs"]["seed"]
    assert request_from_image(comfy_png(tmp_path / "c.png", advanced))[0].seed == 0


def test_cli_from_a_comfyui_graph_with_an_unreadable_seed_stops_before_loading(tmp_path, capsys):
    path = comfy_png(tmp_path / "c.png", _with_seed("random"))
    assert main(["txt2img", "--from", str(path), "-m", str(tmp_path / "none"), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KSampler input 'seed': a seed is a whole number" in err and "got 'random'" in err
    assert "Traceback" not in err


@pytest.fixture
def model():
    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    return str(path)


def test_cli_writes_jpeg_and_from_reads_it(model, tmp_path, capsys):
    out = tmp_path / "outs"
    assert main(["txt2img", "a red circle", "-m", model, "--steps", "3", "--seed", "4", "-q", "--outdir", str(out),
                 "--format", "jpeg"]) == 0  # fmt: skip
    (jpeg,) = out.glob("*.jpg")
    assert "Seed: 4" in read_png_metadata(jpeg)["parameters"]
    assert main(["txt2img", "--from", str(jpeg), "-m", model, "-q", "-o", str(tmp_path / "again.png")]) == 0
    # -o names the format by its ending: --format asking for another was ignored (a PNG written without a word)
    args = ["txt2img", "x", "-m", model, "--steps", "1", "-q", "-o", str(tmp_path / "f.png"), "--format", "jpeg"]
    assert main(args) == 2 and "--format jpeg asks for another" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


def test_from_refuses_what_it_cannot_reproduce_and_warns_about_another_model(model, tmp_path, capsys):
    image = Image.new("RGB", (8, 8))
    text = "a cube\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Model hash: 0123456789, Model: other"
    text += ", Face restoration: CodeFormer"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    image.save(tmp_path / "in.png", pnginfo=info)
    args = ["txt2img", "--from", str(tmp_path / "in.png"), "-m", model, "-q", "-o", str(tmp_path / "o.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot reproduce (Face restoration: CodeFormer)" in err and not (tmp_path / "o.png").exists()
    assert main([*args, "--allow-differences"]) == 0
    err = capsys.readouterr().err
    assert "not reproduced: Face restoration: CodeFormer" in err and "model other [0123456789]" in err
