"""The SDXL base -> refiner hand-off: against diffusers' denoising_end/denoising_start split, against
A1111's switch rules composed by hand from the two models, and bad input refused before any work."""

from __future__ import annotations

import diffusers as D
import numpy as np
import pytest
import torch

import latentforge
from latentforge.io.images import save_png
from latentforge.pipelines import GenerationRequest, RequestError
from latentforge.pipelines.metadata import request_from_image, request_from_infotext
from latentforge.pipelines.plan import conditioning
from latentforge.pipelines.refiner import switch_step
from latentforge.sampling import CFGDenoiser, ModelDenoiser, NoiseSchedule, get_sigmas, resolve
from latentforge.sampling.noise import BrownianNoise, ImageNoise
from tiny import build_reference, diffusers_sdxl, hf_tokenizer, save_folder

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PROMPT, NEGATIVE = "a photo of a red cube on a wooden table", "blurry, low quality"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refiner")
    base_ref, refiner_ref = build_reference("sdxl-base", seed=51), build_reference("sdxl-refiner", seed=52)
    base_path, refiner_path = save_folder(base_ref, tmp / "base"), save_folder(refiner_ref, tmp / "refiner")
    return base_ref, refiner_ref, latentforge.load(base_path), latentforge.load(refiner_path), refiner_path, tmp


def _np(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def test_matches_diffusers_denoising_end_and_start(models):
    base_ref, refiner_ref, base, refiner, _, tmp = models
    scheduler = lambda: D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace")  # noqa: E731
    first = diffusers_sdxl(base_ref, scheduler(), tmp)
    second = D.StableDiffusionXLImg2ImgPipeline(
        refiner_ref.vae,
        None,
        refiner_ref.text_encoders[0],
        None,
        hf_tokenizer("!", tmp / "t3"),
        refiner_ref.unet,
        scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0)
    # 10 Euler steps at timesteps 999, 888, ..., 111, 0: the base keeps t >= 200 (8 steps), and A1111's
    # rule switches at the first step with (999 - t) / 1000 >= 0.8, the same step
    latents = first(
        PROMPT,
        **common,
        height=64,
        width=64,
        denoising_end=0.8,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    theirs = second(PROMPT, **common, image=latents, denoising_start=0.8, output_type="np").images
    result = base.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=10,
        cfg_scale=5.0,
        width=64,
        height=64,
        seed=7,
        sampler="Euler",
        schedule="normal",
        refiner_checkpoint=refiner,
        refiner_switch_at=0.8,
    )
    diff = np.abs(_np(result.images[0]) - theirs[0])
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel diff {diff.max() * 255:.2f}/255"


def test_a1111_switch_rules():
    """Written from A1111: by steps, switch at the first step s with not (s / steps < switch_at); by
    default, at the first step whose nearest timestep t in the model's sigma table has
    (999 - t) / 1000 >= switch_at."""
    schedule = NoiseSchedule()
    sigmas = get_sigmas("normal", schedule, 7)  # steps start at timesteps 999, 832.5, ..., 166.5, 0
    assert switch_step(sigmas, schedule, 0.75, by_steps=True) == 6  # 5/7 < 0.75 <= 6/7; int(0.75 * 7) = 5
    assert switch_step(sigmas, schedule, 0.8, by_steps=True) == 6
    assert switch_step(sigmas, schedule, 1.0, by_steps=True) == 7  # never
    assert switch_step(sigmas, schedule, 0.0, by_steps=True) == 0
    table = schedule.sigmas.float()
    ts = [int(torch.argmin((table - s.float()).abs())) for s in sigmas[:-1]]
    assert ts == [999, 832, 666, 499, 333, 166, 0]  # t = 999 - 166.5 i, rounded to the nearest sigma
    expected = next(i for i, t in enumerate(ts) if (999 - t) / 1000 >= 0.75)  # 166 -> 0.833
    assert expected == 5 and switch_step(sigmas, schedule, 0.75, by_steps=False) == 5
    assert switch_step(sigmas, schedule, 0.999, by_steps=False) == 6  # t = 0: (999 - 0) / 1000 >= 0.999
    assert switch_step(sigmas, schedule, 1.0, by_steps=False) == 7  # never


@pytest.mark.parametrize("sampler,by_steps", [("Euler a", True), ("Euler", False), ("DPM++ 2M SDE", True)])
def test_composed_by_hand_from_both_models(models, sampler, by_steps):
    """A1111 switches models inside one sampler run: the same sigmas, the base's latents, and (ancestral
    samplers) the same noise stream continued. Compose that by hand and compare."""
    _, _, base, refiner, refiner_path, _ = models
    steps, switch_at, seed = 7, 0.75, 21
    req = GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=4.0, width=64, height=64, seed=seed)
    info, _ = resolve(sampler, "normal")
    schedule = NoiseSchedule.for_family(base.family)
    sigmas = get_sigmas("normal", schedule, steps)
    k = 6 if by_steps else 5  # the rules' hand-computed switch steps for 7 steps at 0.75 (test above)
    noise = ImageNoise([seed], (4, 8, 8))
    x = noise.next() * sigmas[0]
    if info.brownian:  # one Brownian tree per image over the whole schedule, as in one sampler run
        noise = BrownianNoise([seed], (4, 8, 8), sigmas[-2], sigmas[0])
    with torch.inference_mode():
        for pipe, part in ((base, sigmas[: k + 1]), (refiner, sigmas[k:])):
            cond, uncond = conditioning(pipe, req, 64, 64, 1, steps)
            model = ModelDenoiser(pipe.unet, schedule, pipe.prediction)
            x = info.fn(CFGDenoiser(model, cond, uncond, 4.0), x, part, noise=noise)
        by_hand = refiner.vae.decode(x).float()
    by_hand = ((by_hand.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    result = base.txt2img(
        request=req.with_options(
            sampler=sampler,
            schedule="normal",
            refiner_checkpoint=str(refiner_path),
            refiner_switch_at=switch_at,
            refiner_switch_by_steps=by_steps,
        )
    )
    assert np.abs(np.asarray(result.images[0], dtype=np.float32) - by_hand).max() <= 1
    text = result.infotexts[0]
    assert "Refiner: refiner, Refiner switch at: 0.75" in text
    assert ("Refiner switch by sampling steps: True" in text) == by_steps
    again, _ = request_from_infotext(text)
    assert again.refiner.checkpoint == "refiner" and again.refiner.switch_at == 0.75
    assert again.refiner.switch_by_steps == by_steps


def test_record_reproduces_and_unused_refiner_is_never_loaded(models, tmp_path):
    _, _, base, _, refiner_path, _ = models
    options = dict(steps=4, width=64, height=64, seed=3, sampler="Euler", schedule="normal")
    result = base.txt2img(PROMPT, refiner_checkpoint=str(refiner_path), refiner_switch_at=0.5, **options)
    save_png(result.images[0], tmp_path / "a.png")
    req, meta = request_from_image(tmp_path / "a.png")
    assert req.refiner.checkpoint == str(refiner_path) and meta["mode"] == "txt2img"
    assert np.array_equal(np.asarray(base.txt2img(request=req).images[0]), np.asarray(result.images[0]))

    opener = base.open_model
    try:
        base.open_model = lambda path: (opener(path)[0], _fail)
        plain = base.txt2img(PROMPT, **options)
        unused = base.txt2img(PROMPT, refiner_checkpoint=str(refiner_path), refiner_switch_at=1.0, **options)
        with pytest.raises(AssertionError, match="loaded"):
            base.txt2img(PROMPT, refiner_checkpoint=str(refiner_path), refiner_switch_at=0.5, **options)
    finally:
        base.open_model = opener
    assert np.array_equal(np.asarray(unused.images[0]), np.asarray(plain.images[0]))
    # A1111's apply_refiner writes "Refiner" and "Refiner switch at" only when it switches
    assert "Refiner" not in unused.infotexts[0]


def _fail():
    raise AssertionError("the refiner was loaded")


def test_bad_refiners_are_refused_before_any_work(models, tmp_path):
    _, _, base, _, _, _ = models
    sd1_path = save_folder(build_reference("sd1", seed=2), tmp_path / "sd1")
    calls = []
    options = dict(steps=2, width=64, height=64, progress=calls.append)
    with pytest.raises(RequestError, match=r"sd1 model .* cannot continue the latents of a sdxl-base model"):
        base.txt2img(PROMPT, refiner_checkpoint=str(sd1_path), **options)
    with pytest.raises(RequestError, match="does not exist"):
        base.txt2img(PROMPT, refiner_checkpoint=str(tmp_path / "missing.safetensors"), **options)
    with pytest.raises(RequestError, match="refiner_switch_at must be between 0 and 1"):
        base.txt2img(PROMPT, refiner_checkpoint=str(sd1_path), refiner_switch_at=1.5, **options)
    with pytest.raises(RequestError, match=r"Hires\. fix"):
        base.txt2img(PROMPT, refiner_checkpoint=base, enable_hr=True, **options)
    assert not calls


def test_cli_refiner_options(models, tmp_path):
    from PIL import Image

    from latentforge.cli import main

    _, _, base, _, refiner_path, _ = models
    out = tmp_path / "r.png"
    args = ["txt2img", "a cube", "-m", base.info.source, "--steps", "2", "-W", "64", "-H", "64", "--seed", "1"]
    args += ["--refiner", str(refiner_path), "--refiner-switch-at", "0.5", "--refiner-switch-by-steps", "-q"]
    assert main([*args, "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    # A1111's apply_refiner writes "switch by sampling steps" on every call, before it switches
    assert "Refiner switch by sampling steps: True, Refiner: refiner, Refiner switch at: 0.5" in text


def test_infotext_names_a_refiner_file_as_a1111_does(tmp_path):
    """A1111: "Refiner: <file name without extension> [<first 10 hex digits of its sha256>]"."""
    import hashlib

    from latentforge.pipelines.infotext_fields import _refiner_fields
    from latentforge.pipelines.request import RefinerOptions

    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    path.write_bytes(b"not really a model")
    fields = _refiner_fields(RefinerOptions(checkpoint=str(path), switch_at=0.8))
    digest = hashlib.sha256(b"not really a model").hexdigest()[:10]
    assert fields["Refiner"] == f"sd_xl_refiner_1.0 [{digest}]" and fields["Refiner switch at"] == "0.8"
    req, _ = request_from_infotext(f"x\nSteps: 20, Refiner: sd_xl_refiner_1.0 [{digest}], Refiner switch at: 0.8")
    assert req.refiner.checkpoint == "sd_xl_refiner_1.0" and req.refiner.switch_at == 0.8
    assert not req.refiner.switch_by_steps and "Refiner" not in req.extra
