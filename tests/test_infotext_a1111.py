"""The settings line of the infotext against A1111 1.10's ``create_infotext`` (modules/processing.py): its
fixed fields in their dict-literal order, then ``p.extra_generation_params`` in the order A1111 adds them
(scripts' process, ``init``'s hires or mask fields, the networks' hashes, img2img's noise multiplier, the
sampler's ``get_sigmas`` and ``initialize``, the refiner, NGMS), then Version; "Schedule type" as
``KDiffusionSampler.get_sigmas`` writes it. Each expectation is written here from those rules."""

from __future__ import annotations

import pytest

from latentforge.io.infotext import format_infotext, parse_infotext
from latentforge.pipelines import GenerationRequest
from latentforge.pipelines.infotext_fields import infotext_params
from latentforge.sampling.registry import resolve


def _line(pipe, mode: str = "txt2img", extra: dict | None = None, **fields) -> dict:
    base = dict(prompt="a cube", steps=4, width=64, height=64, cfg_scale=7.0, seed=1)
    req = GenerationRequest.from_dict({**base, **fields})
    info = resolve(req.sampler, req.schedule)[0]
    params = infotext_params(pipe, req, 1, info, mode, extra=extra)
    return {k: v for k, v in params.items() if v is not None}


def _keys(params: dict) -> list[str]:
    return list(params)


# get_sigmas: "Automatic" becomes the sampler config's scheduler where it names one (samplers_k_diffusion:
# karras for DPM++ 2M / SDE / 2S a, DPM2, DPM2 a, Restart; exponential for the 2M SDE and 3M SDE ones), else it
# stays "Automatic"; a scheduler asked for is written by its label; samplers over timesteps keep p.scheduler
@pytest.mark.parametrize(
    "sampler, schedule, label",
    [
        ("Euler a", "automatic", "Automatic"),
        ("Euler", "automatic", "Automatic"),
        ("UniPC", "automatic", "Automatic"),
        ("LCM", "automatic", "Automatic"),
        ("DDIM", "automatic", "Automatic"),
        ("PLMS", "automatic", "Automatic"),
        ("DPM++ 2M", "automatic", "Karras"),
        ("DPM++ SDE", "automatic", "Karras"),
        ("DPM++ 2M SDE", "automatic", "Exponential"),
        ("DPM++ 3M SDE", "automatic", "Exponential"),
        ("DPM++ 2M Karras", "automatic", "Karras"),  # a legacy name: its scheduler
        ("Euler", "Uniform", "Uniform"),
        ("Euler", "normal", "Normal"),
        ("DPM++ 2M", "Exponential", "Exponential"),
        ("DDIM", "Karras", "Karras"),
    ],
)
def test_schedule_type_is_written_as_a1111_get_sigmas_writes_it(demo, sampler, schedule, label):
    params = _line(demo, sampler=sampler, schedule=schedule)
    assert params["Schedule type"] == label
    assert _keys(params)[:4] == ["Steps", "Sampler", "Schedule type", "CFG scale"]


def test_fixed_fields_come_before_every_extra(demo):
    extra = {
        "Lora hashes": "demo_star: cca72b051e62",
        "TI hashes": "scarlet: 3b5271d521a6",
        "Token merging ratio": "0.3",
        "ControlNet 0": "Module: canny",
    }
    params = _line(demo, extra=extra, clip_skip=2, tiling=True, s_min_uncond=2.0, rng="CPU")
    order = ["Clip skip", "Token merging ratio", "RNG", "Tiling", "ControlNet 0", "Lora hashes", "TI hashes", "NGMS"]
    assert [k for k in _keys(params) if k in order] == order
    assert _keys(params)[-1] == "Version"


def test_img2img_fields_in_a1111_order(demo):
    extra = {  # as the tasks add them (inpaint.prepare's own order, the conditioning weight)
        "Masked content": "fill",
        "Mask blur": 4,
        "Mask mode": "Inpaint not masked",
        "Inpaint area": "Only masked",
        "Masked area padding": 32,
        "Lora hashes": "x: 0123456789ab",
        "Conditional mask weight": "1.0",
    }
    params = _line(demo, "img2img", extra=extra, sampler="Euler a", clip_skip=2, initial_noise_multiplier=0.9, eta=0.5)
    order = ["Denoising strength", "Conditional mask weight", "Clip skip", "RNG", "Mask mode", "Mask blur"]
    order += ["Inpaint area", "Masked area padding", "Masked content", "Lora hashes", "Noise multiplier", "Eta"]
    assert [k for k in _keys(params) if k in order] == order


def test_rng_is_left_out_for_a1111s_default_source(demo):
    assert "RNG" not in _line(demo, rng="GPU")
    assert _line(demo, rng="CPU")["RNG"] == "CPU" and _line(demo, rng="NV")["RNG"] == "NV"


# is_sampler_using_eta_noise_seed_delta: a "uses_ensd" sampler (Euler a, DPM2 a, DPM++ 2S a, DPM fast, DPM
# adaptive) whose eta (None: 1) is not 0
def test_ensd_only_for_samplers_that_use_it(demo):
    assert _line(demo, sampler="Euler a", eta_noise_seed_delta=31337)["ENSD"] == 31337
    assert "ENSD" not in _line(demo, sampler="Euler a", eta=0.0, eta_noise_seed_delta=31337)
    assert "ENSD" not in _line(demo, sampler="DPM++ 2M", eta_noise_seed_delta=31337)
    assert "ENSD" not in _line(demo, sampler="DPM++ 2M SDE", eta_noise_seed_delta=31337)


# Sampler.initialize: eta only for a sampler function with an eta parameter and not at its default (k-diffusion
# 1.0, "Eta"; DDIM 0.0, "Eta DDIM"); the sigma settings only for samplers that take them
def test_eta_and_sigma_settings_only_where_the_sampler_takes_them(demo):
    assert "Eta" not in _line(demo, sampler="Euler a", eta=1.0)
    assert _line(demo, sampler="Euler a", eta=0.5)["Eta"] == "0.5"
    assert "Eta" not in _line(demo, sampler="DPM++ 2M", eta=0.5)
    assert _line(demo, sampler="DDIM", eta=0.3)["Eta DDIM"] == "0.3"
    assert not {"Eta", "Eta DDIM"} & set(_line(demo, sampler="PLMS", eta=0.5))
    assert not {"Eta", "Eta DDIM"} & set(_line(demo, sampler="UniPC", eta=0.0))
    assert _line(demo, sampler="Euler", s_churn=0.5)["Sigma churn"] == "0.5"
    assert "Sigma churn" not in _line(demo, sampler="DPM++ 2M", s_churn=0.5)
    params = _line(demo, sampler="Euler", s_churn=0.5, sgm_noise_multiplier=True)
    assert [k for k in _keys(params) if k in ("SGM noise multiplier", "Sigma churn")] == [
        "SGM noise multiplier",
        "Sigma churn",
    ]


def test_beta_schedule_writes_its_parameters(demo):
    params = _line(demo, sampler="Euler", schedule="beta")
    assert (params["Beta schedule alpha"], params["Beta schedule beta"]) == ("0.6", "0.6")
    assert "Beta schedule alpha" not in _line(demo, sampler="Euler", schedule="karras")


# init: the hires fields in the order Hires checkpoint, sampler, prompt, negative prompt, schedule type, upscale,
# steps, upscaler; get_sigmas' hires branch writes "Hires schedule type" only for a scheduler (not Automatic
# without one) whose label differs from the first pass's
def test_hires_fields_order_and_schedule_type(demo):
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.7)
    params = _line(demo, sampler="DPM++ 2M", hr_sampler_name="Euler", hr_prompt="a sphere", **hires)
    assert "Hires schedule type" not in params
    order = ["Hires sampler", "Hires prompt", "Hires upscale", "Hires steps", "Hires upscaler"]
    assert [k for k in _keys(params) if k.startswith("Hires")] == order
    assert _line(demo, sampler="Euler", hr_sampler_name="DPM++ 2M", **hires)["Hires schedule type"] == "Karras"
    assert "Hires schedule type" not in _line(demo, sampler="DPM++ 2M", hr_sampler_name="DPM++ SDE", **hires)
    assert "Hires schedule type" not in _line(demo, sampler="Euler", hr_sampler_name="DDIM", **hires)


def test_numbers_are_written_whole_or_in_full(demo):
    params = _line(demo, cfg_scale=7.123456789)
    assert params["CFG scale"] == "7.123456789" and _line(demo, cfg_scale=7.0)["CFG scale"] == "7"


def test_an_empty_prompt_leaves_no_empty_first_line():
    assert format_infotext("", "", {"Steps": 20, "Sampler": "Euler"}) == "Steps: 20, Sampler: Euler"
    text = format_infotext("", "ugly", {"Steps": 20, "Sampler": "Euler", "Seed": 1})
    assert text == "Negative prompt: ugly\nSteps: 20, Sampler: Euler, Seed: 1"
    assert parse_infotext(text) == ("", "ugly", {"Steps": "20", "Sampler": "Euler", "Seed": "1"})
