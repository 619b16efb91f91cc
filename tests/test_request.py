"""The request: core fields, typed option groups, A1111's flat names, strict and lenient parsing."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from latentforge.pipelines import (
    GenerationOptions,
    GenerationRequest,
    HiresOptions,
    InpaintOptions,
    RefinerOptions,
    RequestError,
)
from latentforge.pipelines.request import _FLAT

# What an A1111 client (webuiapi, the web UI's own API page) sends to /sdapi/v1/txt2img: every field,
# the switched-off features with their defaults (A1111's API documentation, StableDiffusionProcessingTxt2Img).
A1111_TXT2IMG = {
    "prompt": "a castle",
    "negative_prompt": "",
    "styles": [],
    "seed": 5,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 20,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0.7,
    "s_min_uncond": 0,
    "s_churn": 0,
    "s_tmax": None,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": "",
    "refiner_switch_at": 0.8,
    "disable_extra_networks": False,
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


def test_flat_a1111_names_fold_into_the_groups():
    req = GenerationRequest.from_dict({"prompt": "x", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos"})
    assert req.hires == HiresOptions(scale=1.5, upscaler="Lanczos")
    assert GenerationRequest.from_dict({"enable_hr": False, "hr_scale": 3}).hires is None
    assert GenerationRequest.from_dict({"hr_scale": 3}).hires is None  # off: A1111 ignores hr_* then
    nested = GenerationRequest.from_dict({"hires": {"scale": 3, "second_pass_steps": 4}})
    assert nested.hires == HiresOptions(scale=3, second_pass_steps=4)
    req = GenerationRequest.from_dict({"refiner_checkpoint": "r.safetensors", "refiner_switch_at": 0.6})
    assert req.refiner == RefinerOptions("r.safetensors", 0.6)
    assert GenerationRequest.from_dict({"refiner_checkpoint": "", "refiner_switch_at": 0.6}).refiner is None
    assert GenerationRequest.from_dict({"mask": "m.png", "mask_blur": 8}).inpaint == InpaintOptions("m.png", 8)
    assert GenerationRequest.from_dict({"mask_blur": 8}).inpaint is None


def test_with_options_changes_an_existing_group_and_can_switch_it_off():
    req = GenerationRequest.from_dict({"enable_hr": True, "hr_scale": 1.5})
    assert req.with_options(hr_second_pass_steps=7).hires == HiresOptions(scale=1.5, second_pass_steps=7)
    assert req.with_options(enable_hr=False).hires is None
    assert req.with_options(steps=9).steps == 9 and req.steps == 20


def test_round_trip_through_plain_data():
    req = GenerationRequest.from_dict({"prompt": "p", "enable_hr": True, "hr_resize_x": 640, "seed": 3})
    assert GenerationRequest.from_dict(req.to_dict()) == req


def test_records_written_before_the_groups_still_load():
    """Images made before the option groups carry flat hires fields in their JSON record."""
    old = {**dataclasses.asdict(GenerationRequest(prompt="p")), "enable_hr": True, "hr_scale": 1.5}
    for key in ("hires", "inpaint", "refiner", "networks", "control"):
        old.pop(key)
    old.update(hr_upscaler="Latent", hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0)
    assert GenerationRequest.from_dict(old).hires == HiresOptions(scale=1.5, upscaler="Latent")


def test_strict_parsing_names_unknown_fields_and_lenient_keeps_them():
    with pytest.raises(RequestError, match="unknown request field\\(s\\): firstphase_width, n_iter"):
        GenerationRequest.from_dict({"prompt": "x", "n_iter": 2, "firstphase_width": 0})
    req = GenerationRequest.from_dict(A1111_TXT2IMG, lenient=True)
    assert req.prompt == "a castle" and req.seed == 5 and req.hires is None and req.refiner is None
    assert req.extra["sampler_name"] == "Euler a" and req.extra["alwayson_scripts"] == {}
    assert "enable_hr" not in req.extra and "hr_scale" not in req.extra
    with pytest.raises(RequestError, match="unknown hires field\\(s\\): factor"):
        GenerationRequest.from_dict({"hires": {"factor": 2}})


def test_editor_visible_options_cover_every_field_and_flat_name():
    options = set(typing.get_type_hints(GenerationOptions))
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert options == fields | set(_FLAT) | {"enable_hr"}


def test_groups_that_generation_cannot_run_yet_are_refused_before_any_work(tmp_path):
    import latentforge
    from tiny import build_reference, save_folder

    pipe = latentforge.load(save_folder(build_reference("sd1", seed=2), tmp_path / "m"))
    # ControlNet units run now: a unit without its control image is refused before any work
    with pytest.raises(RequestError, match="control unit 0: no control image"):
        pipe.txt2img("x", steps=1, width=64, height=64, control=[{"model": "canny"}])
    # networks run now: an unknown name is refused before any work, saying where to put the file
    from latentforge.adapters.folders import AdapterNotFound

    with pytest.raises(AdapterNotFound, match=r"LoRA 'style'.*--lora-dir"):
        pipe.txt2img("x", steps=1, width=64, height=64, networks=[{"name": "style", "strength": 0.8}])
    assert pipe.patcher.sources == []
    with pytest.raises(RequestError, match="need an init image"):
        pipe.txt2img("x", steps=1, width=64, height=64, mask="mask.png")


def test_refiner_group_runs_and_checks_its_model_before_any_work(tmp_path):
    """The refiner is no longer refused: its checkpoint is opened (names and shapes only) and checked."""
    import latentforge
    from tiny import build_reference, save_folder

    pipe = latentforge.load(save_folder(build_reference("sd1", seed=2), tmp_path / "m"))
    req = GenerationRequest.from_dict({"refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.7})
    assert req.refiner.checkpoint == "refiner.safetensors" and req.refiner.switch_at == 0.7
    with pytest.raises(RequestError, match=r"refiner_checkpoint 'refiner\.safetensors' does not exist"):
        pipe.txt2img("x", steps=1, width=64, height=64, refiner_checkpoint="refiner.safetensors")


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold():
    """A slider's or an array's np.int64 was refused: "width must be a whole number or none, got int64 64"."""
    import numpy as np

    req = GenerationRequest.from_dict({"width": np.int64(64), "steps": np.int32(3), "cfg_scale": np.float32(2.5)})
    req.validate()
    assert (req.width, req.steps, req.cfg_scale) == (64, 3, 2.5)
    assert type(req.width) is int and type(req.cfg_scale) is float
