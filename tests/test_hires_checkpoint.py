"""A1111's hr_checkpoint_name: another model runs the hires pass. A1111 (processing.py, txt2img ``sample``)
decodes the first pass with the first model, switches models, encodes the upscaled image with the new
model's VAE, samples the hires pass with its text encoders and UNet, and decodes with its VAE; a latent
upscaler hands it the latents as they are. Expected images come from composing the public API by hand:
the first pass of the base model, A1111's Lanczos input, then the other model's img2img."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latentforge
from latentforge.pipelines import RequestError
from latentforge.pipelines.images import tensor_to_images
from latentforge.pipelines.metadata import request_from_infotext, unreproduced_fields
from test_hires import _a1111_lanczos_input, _spy_first_pass
from test_lora import kohya_and_peft
from tiny import build_reference, save_folder

BASE = dict(seed=21, steps=4, width=64, height=64, sampler="Euler", denoising_strength=0.5)
# the hires pass as the Python API's img2img: A1111 runs the last 4 steps of a schedule of int(4 / 0.5) = 8
# (setup_img2img_steps with steps given); img2img with 8 steps and strength 3.5 / 8 runs the same
SECOND = {**BASE, "width": 128, "height": 128, "steps": 8, "denoising_strength": 3.5 / 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hrck")
    ref = build_reference("sd1", seed=81)
    base = save_folder(ref, tmp / "base")
    other = latentforge.load(save_folder(build_reference("sd1", seed=82), tmp / "other_folder"))
    other_file = other.save(tmp / "other.safetensors")
    xl = save_folder(build_reference("sdxl-base", seed=83), tmp / "xl")
    return {"ref": ref, "base": base, "other": other_file, "xl": xl, "tmp": tmp}


@pytest.fixture(scope="module")
def pipe(models):
    return latentforge.load(models["base"])


def test_the_hires_pass_is_the_other_models_img2img_of_the_resized_image(pipe, models, monkeypatch):
    seen = _spy_first_pass(monkeypatch)
    result = pipe.txt2img(
        "a cube", enable_hr=True, hr_upscaler="Lanczos", hr_checkpoint_name=str(models["other"]), **BASE
    )
    assert result.images[0].size == (128, 128)
    first = pipe.txt2img("a cube", **BASE)  # the first pass is the base model's own txt2img
    first_image = tensor_to_images(pipe.vae.decode(seen["first"]))[0]
    assert np.array_equal(np.asarray(first_image), np.asarray(first.images[0]))
    other = latentforge.load(models["other"])
    expected = other.img2img(_a1111_lanczos_input(pipe, seen["first"], 128), "a cube", **SECOND)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))
    same = pipe.txt2img("a cube", enable_hr=True, hr_upscaler="Lanczos", **BASE)  # without: another image
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(same.images[0]))


def test_the_same_model_from_its_file_gives_the_plain_hires_image(pipe, models):
    """The first model's own files as hr_checkpoint_name: a second copy of the same weights, the same pixels
    as no hires checkpoint (and "Use same checkpoint" is A1111's word for none)."""
    plain = pipe.txt2img("a cube", enable_hr=True, hr_upscaler="Latent", **BASE)
    again = pipe.txt2img("a cube", enable_hr=True, hr_upscaler="Latent", hr_checkpoint_name=str(models["base"]), **BASE)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
    same = pipe.txt2img(
        "a cube", enable_hr=True, hr_upscaler="Latent", hr_checkpoint_name="Use same checkpoint", **BASE
    )
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    assert "Hires checkpoint" not in same.infotexts[0]
    itself = pipe.txt2img("a cube", enable_hr=True, hr_upscaler="Latent", hr_checkpoint_name=pipe, **BASE)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(itself.images[0]))
    assert "Hires checkpoint" not in itself.infotexts[0] and itself.request.hires.checkpoint == ""


def test_latents_go_only_to_a_model_of_the_same_latent_space(pipe, models):
    with pytest.raises(RequestError, match=r"hr_checkpoint_name .*cannot continue the latents"):
        pipe.txt2img("a cube", enable_hr=True, hr_upscaler="Latent", hr_checkpoint_name=str(models["xl"]), **BASE)
    # an image upscaler decodes and encodes: an SDXL model may run the hires pass of an SD1 model
    crossed = pipe.txt2img(
        "a cube", enable_hr=True, hr_upscaler="Lanczos", hr_checkpoint_name=str(models["xl"]), **BASE
    )
    assert crossed.images[0].size == (128, 128)
    with pytest.raises(RequestError, match="does not exist"):
        pipe.txt2img("a cube", enable_hr=True, hr_checkpoint_name=str(models["tmp"] / "nothing.safetensors"), **BASE)
    with pytest.raises(RequestError, match="hr_checkpoint_name must name"):
        pipe.txt2img("a cube", enable_hr=True, hr_checkpoint_name=5, **BASE)


def test_infotext_names_the_hires_checkpoint_as_a1111_and_reads_back(pipe, models):
    result = pipe.txt2img(
        "a cube", enable_hr=True, hr_upscaler="Latent", hr_checkpoint_name=str(models["other"]), **BASE
    )
    digest = hashlib.sha256(models["other"].read_bytes()).hexdigest()[:10]
    text = result.infotexts[0]
    assert f"Hires checkpoint: other [{digest}]" in text
    req, _ = request_from_infotext(text)
    assert req.hires.checkpoint == "other" and unreproduced_fields(req) == []
    assert result.request.hires.checkpoint == str(models["other"])  # the JSON record: the file


def test_a_loaded_pipeline_gets_the_requests_lora_for_the_pass_only(pipe, models, monkeypatch, tmp_path):
    """The prompt's LoRA applies to the hires model too (A1111 activates the hires prompt's networks on the
    model it switched to), and is taken off it afterwards."""
    other = latentforge.load(models["other"])
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(kohya_and_peft(models["ref"], pipe, "kohya-diffusers", seed=11), folder / "ink.safetensors")
    pipe.folders.lora = other.folders.lora = [folder]
    before = {k: v.clone() for k, v in other.unet.state_dict().items()}
    seen = _spy_first_pass(monkeypatch)
    try:
        result = pipe.txt2img(
            "a cube <lora:ink:0.8>", enable_hr=True, hr_upscaler="Lanczos", hr_checkpoint_name=other, **BASE
        )
        resized = _a1111_lanczos_input(pipe, seen["first"], 128)
        expected = other.img2img(resized, "a cube <lora:ink:0.8>", **SECOND)
    finally:
        pipe.folders.lora = other.folders.lora = []
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))
    assert other.patcher.sources == [] and pipe.patcher.sources == []
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in before.items())


def test_controlnet_units_with_a_hires_checkpoint_are_refused(pipe, models):
    unit = {"model": "anything", "image": Image.new("RGB", (64, 64))}
    with pytest.raises(RequestError, match="ControlNet units with another model for the hires pass"):
        pipe.txt2img("a cube", enable_hr=True, hr_checkpoint_name=str(models["other"]), control=[unit], **BASE)


def test_cli_hires_checkpoint_writes_the_infotext_and_needs_hires(models, tmp_path, capsys):
    from latentforge.cli import main

    out = tmp_path / "out.png"
    common = ["txt2img", "a cube", "-m", str(models["base"]), "--steps", "2", "-W", "64", "-H", "64", "-o", str(out)]
    assert main([*common, "--hires-checkpoint", str(models["other"])]) == 2
    assert "--hires-checkpoint set(s) the hires pass" in capsys.readouterr().err
    assert main([*common, "--hires", "1.5", "--hires-checkpoint", str(models["other"])]) == 0
    assert "Hires checkpoint: other [" in Image.open(out).info["parameters"]


def test_token_merging_of_the_hires_pass_runs_on_the_other_model(pipe, models, monkeypatch):
    """A1111's sample_hr_pass applies token merging (the hr ratio) to the model it switched to: here the
    hires pass's ratio reached only the first model's UNet, so the other model ran unmerged."""
    seen = _spy_first_pass(monkeypatch)
    other = latentforge.load(models["other"])  # given loaded, as the server gives its cached pipeline
    options = dict(enable_hr=True, hr_upscaler="Lanczos", hr_checkpoint_name=other, **BASE)
    merged = pipe.txt2img("a cube", token_merging_ratio_hr=0.9, **options)
    assert other.patcher.sources == [] and pipe.patcher.sources == []  # the hooks are off both again
    size = SECOND
    expected = other.img2img(_a1111_lanczos_input(pipe, seen["first"], 128), "a cube", token_merging_ratio=0.9, **size)
    assert np.array_equal(np.asarray(merged.images[0]), np.asarray(expected.images[0]))
    plain = pipe.txt2img("a cube", **options)
    assert not np.array_equal(np.asarray(merged.images[0]), np.asarray(plain.images[0]))
