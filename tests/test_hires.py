"""A1111's Hires. fix: txt2img, upscale, then img2img at the larger size with the same seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.pipelines import GenerationRequest, HiresOptions, RequestError, hires, plan
from latentforge.pipelines.images import tensor_to_images
from latentforge.pipelines.metadata import request_from_infotext, unreproduced_fields
from tiny import build_reference, save_folder

BASE = dict(seed=21, steps=4, width=64, height=64, sampler="Euler", denoising_strength=0.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_folder(build_reference("sd1", seed=81), tmp_path_factory.mktemp("hr") / "m")


@pytest.fixture(scope="module")
def pipe(model):
    return latentforge.load(model)


def _spy_first_pass(monkeypatch) -> dict:
    """Catches the first pass's latents on their way to the hires upscaler (``seen["first"]``)."""
    seen = {}
    original = hires.upscale

    def spy(p, latents, *args, **kwargs):
        seen["first"] = latents.clone()
        return original(p, latents, *args, **kwargs)

    monkeypatch.setattr(hires, "upscale", spy)
    return seen


def _a1111_lanczos_input(pipe, latents, size: int) -> Image.Image:
    """A1111's image upscaler input: decode, to 8 bits by truncation, resize (Lanczos here)."""
    decoded = ((pipe.vae.decode(latents).float()[0] + 1) / 2).clamp(0, 1)
    pixels = (255.0 * decoded.permute(1, 2, 0).numpy()).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)


def test_first_pass_is_txt2img_and_second_pass_is_img2img_of_the_resized_image(pipe, monkeypatch):
    seen = _spy_first_pass(monkeypatch)
    result = pipe.txt2img("a cube", enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", **BASE)
    assert result.images[0].size == (128, 128)

    plain = pipe.txt2img("a cube", **BASE).images[0]
    first_image = tensor_to_images(pipe.vae.decode(seen["first"]))[0]
    assert np.array_equal(np.asarray(first_image), np.asarray(plain))

    # then img2img of the resized image with the same seed, as A1111's sample_hr_pass runs it: it passes
    # steps (4) to sample_img2img, so setup_img2img_steps makes a schedule of int(4 / 0.5) = 8 steps and
    # runs its last 4 (t_enc = 3); plain img2img runs int(strength * steps) + 1 of its steps: with 8 steps
    # and strength 3.5 / 8, t_enc = 3 too
    resized = _a1111_lanczos_input(pipe, seen["first"], 128)
    same = {**BASE, "width": 128, "height": 128, "steps": 8, "denoising_strength": 3.5 / 8}
    expected = pipe.img2img(resized, "a cube", **same).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    plain_rule = pipe.img2img(resized, "a cube", **{**BASE, "width": 128, "height": 128}).images[0]
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain_rule))


@pytest.mark.parametrize(
    ("steps", "strength", "sampler"), [(20, 0.7, "Euler a"), (20, 0.5, "DPM++ 2M"), (7, 0.3, "DPM2")]
)
def test_hires_pass_runs_its_steps_from_a_longer_schedule(steps, strength, sampler):
    """A1111's setup_img2img_steps with steps given (its hires pass): steps = int(N / min(strength, 0.999)),
    t_enc = N - 1, sigma_sched = sigmas[steps - t_enc - 1:]: exactly N steps, the schedule's last."""
    from latentforge.pipelines.hires import hires_schedule
    from latentforge.pipelines.plan import pass_sigmas
    from latentforge.sampling import NoiseSchedule
    from latentforge.sampling.registry import resolve

    info, schedule = resolve(sampler)
    noise = NoiseSchedule()
    total = int(steps / min(strength, 0.999))
    full = pass_sigmas(info, schedule, noise, total)
    got = hires_schedule(info, schedule, noise, steps, strength)[1]
    assert len(got) == steps + 1 and torch.equal(got, full[total - (steps - 1) - 1 :])


def test_upscaler_none_is_a1111s_lanczos_resize(pipe):
    """A1111 lists "None" among the hires upscalers: its UpscalerNone returns the image unchanged and
    images.resize_image then brings it to the target size with Lanczos. It was refused as unknown."""
    lanczos = pipe.txt2img("a cube", enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", **BASE)
    none = pipe.txt2img("a cube", enable_hr=True, hr_scale=1.5, hr_upscaler="None", **BASE)
    assert np.array_equal(np.asarray(none.images[0]), np.asarray(lanczos.images[0]))
    assert "Hires upscaler: None" in none.infotexts[0]
    assert request_from_infotext(none.infotexts[0])[0].hires.upscaler == "None"


def test_latent_upscalers_interpolate_the_latents():
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    up = hires.upscale(None, latents, "latent (nearest)", (4, 16, 16))
    assert torch.equal(up, latents.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    smooth = hires.upscale(None, latents, "Latent", (4, 16, 16))
    assert smooth.shape == (1, 4, 16, 16) and not torch.equal(smooth, up)


def test_infotext_names_the_hires_settings_and_reads_back(pipe):
    result = pipe.txt2img("a cube", enable_hr=True, hr_second_pass_steps=3, **BASE)
    text = result.infotexts[0]
    expected = ["Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 3"]
    for field in expected:
        assert field in text
    # A1111 writes "Hires upscaler" only when hr_upscaler was given (processing.py: `if self.hr_upscaler is not
    # None`); without it the upscaler is its default, Latent
    assert "Hires upscaler" not in text
    req, meta = request_from_infotext(text)
    assert meta["mode"] == "txt2img"
    assert req.hires == HiresOptions(scale=2.0, second_pass_steps=3)
    named = pipe.txt2img("a cube", enable_hr=True, hr_second_pass_steps=3, hr_upscaler="Latent", **BASE)
    assert "Hires upscaler: Latent" in named.infotexts[0]
    assert np.array_equal(np.asarray(named.images[0]), np.asarray(result.images[0]))  # the same upscaler
    plain = pipe.txt2img("a cube", **BASE).infotexts[0]
    assert "Hires" not in plain and "Denoising strength" not in plain


def test_cli_hires_and_from_reproduce_the_pixels(model, tmp_path):
    out, again = tmp_path / "hr.png", tmp_path / "again.png"
    args = ["txt2img", "a cube", "-m", str(model), "--seed", "4", "--steps", "3", "-W", "64", "-H", "64", "-q"]
    assert main([*args, "--hires", "1.5", "--hires-upscaler", "Nearest", "--strength", "0.6", "-o", str(out)]) == 0
    assert Image.open(out).size == (96, 96)
    assert main(["txt2img", "--from", str(out), "-m", str(model), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hr_upscaler="ESRGAN_4x"), "unknown hires upscaler 'ESRGAN_4x'; choose one of: Latent"),
        (dict(hr_scale=0), "hr_scale must be above 0"),
        (dict(hr_second_pass_steps=-1), "hr_second_pass_steps must be 0"),
        (dict(denoising_strength=1.5), "denoising_strength must be between 0 and 1"),
    ],
)
def test_bad_hires_settings_are_refused(pipe, options, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        pipe.txt2img("a cube", **{**BASE, "enable_hr": True, **options})


def test_resize_to_one_side_keeps_the_aspect_ratio(pipe):
    image = pipe.txt2img("a cube", enable_hr=True, hr_resize_x=128, **{**BASE, "height": 96}).images[0]
    assert image.size == (128, 96 * 2)


def test_hires_pass_prompt_editing_goes_on_from_the_first_pass(pipe, monkeypatch):
    """A1111 1.7+ lays the hires pass's schedules on the first pass's timeline (prompt_parser with
    hires_steps): a step number counts on from the first pass's steps (when - 4 here), a fraction from 1.0
    ((when - 1) * 6). Expected schedules worked out by hand from those formulas."""
    schedules = []
    original = plan.prompt_schedule

    def spy(text, steps, *args):
        entries = original(text, steps, *args)
        schedules.append((steps, entries))
        return entries

    monkeypatch.setattr(plan, "prompt_schedule", spy)
    prompt = "[a:b:0.5] [c:d:1.5] [e:f:6] [g:h:3] [i:j:1.0]"
    options = {**BASE, "cfg_scale": 1.0}  # no negative prompt: one schedule a pass
    pipe.txt2img(prompt, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=6, **options)
    first = [(2, "a c e g i"), (3, "b c e g i"), (4, "b c e h i")]  # 0.5*4=2, 1.5*4 and 6 past 4, 3, 1.0*4=4
    # hires: (0.5-1)*6 < 1: b; (1.5-1)*6 = 3; 6-4 = 2; 3-4 < 1: h; (1.0-1)*6 = 0: j
    second = [(2, "b c e h j"), (3, "b c f h j"), (6, "b d f h j")]
    assert schedules == [(4, first), (6, second)]


def test_hires_pass_calls_count_both_calls_of_second_order_steps():
    req = GenerationRequest(prompt="a", steps=4, sampler="Heun", hires=HiresOptions(second_pass_steps=6))
    assert hires.pass_calls(req) == (8, 12)
    assert hires.pass_calls(dataclasses.replace(req, sampler="Euler", hires=HiresOptions())) == (4, 4)


def test_hires_pass_prompt_limits_are_checked_before_any_step(pipe):
    # 100 edits past the 2 first-pass steps: one text in the first pass, 101 in a hires pass of 150 steps
    prompt = "a red circle " + " ".join(f"[x:y:{n}]" for n in range(3, 103))
    req = GenerationRequest(prompt=prompt, steps=2, hires=HiresOptions(second_pass_steps=150))
    with pytest.raises(RequestError, match=r"prompt \(hires pass\): .*more than 100 different prompts over 150 steps"):
        req.validate()  # text only: no model needed
    dataclasses.replace(req, hires=HiresOptions(second_pass_steps=99)).validate()  # 100 texts
    dataclasses.replace(req, hires=HiresOptions(second_pass_steps=150)).validate(img2img=True)  # no hires pass
    steps = []
    with pytest.raises(RequestError, match=r"hires pass"):
        pipe.txt2img(
            prompt,
            enable_hr=True,
            hr_second_pass_steps=150,
            progress=lambda p: steps.append(p),
            **{**BASE, "steps": 2},
        )
    assert steps == []


def test_hires_pass_of_its_own_is_img2img_with_its_prompts_sampler_and_schedule(pipe, monkeypatch):
    """A1111 1.6+: hr_prompt, hr_negative_prompt, hr_sampler_name and hr_scheduler apply to the second
    pass only. Expected: the first pass as plain txt2img, then the Python API's img2img of the resized
    image with the hires pass's own settings."""
    seen = _spy_first_pass(monkeypatch)
    own = dict(hr_prompt="a sphere", hr_negative_prompt="blurry", hr_sampler_name="Euler a", hr_scheduler="Karras")
    options = {**BASE, "cfg_scale": 4.0}
    result = pipe.txt2img("a cube", enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", **own, **options)
    plain = pipe.txt2img("a cube", **options).images[0]
    assert np.array_equal(np.asarray(tensor_to_images(pipe.vae.decode(seen["first"]))[0]), np.asarray(plain))
    resized = _a1111_lanczos_input(pipe, seen["first"], 128)
    second = {**options, "width": 128, "height": 128, "sampler": "Euler a", "schedule": "Karras"}
    second.update(steps=8, denoising_strength=3.5 / 8)  # A1111's hires steps rule (see the first test)
    expected = pipe.img2img(resized, "a sphere", negative_prompt="blurry", **second).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    same = pipe.txt2img("a cube", enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", **options).images[0]
    assert not np.array_equal(np.asarray(same), np.asarray(expected))

    # A1111's infotext fields, written where they differ from the first pass's, and read back
    text = result.infotexts[0]
    for field in ("Hires prompt: a sphere", "Hires negative prompt: blurry", "Hires sampler: Euler a"):
        assert field in text
    # A1111: "Automatic" for Euler (its config names no scheduler), the hires pass's Karras written apart
    assert "Hires schedule type: Karras" in text and "Schedule type: Automatic" in text
    req, _ = request_from_infotext(text)
    assert (req.hires.prompt, req.hires.negative_prompt) == ("a sphere", "blurry")
    assert (req.hires.sampler, req.hires.schedule) == ("Euler a", "Karras")
    assert unreproduced_fields(req) == []  # --from makes the same image without a warning
    again = pipe.txt2img(**{**req.to_dict(), "width": 64, "height": 64})
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    for name in ("Hires prompt", "Hires negative prompt", "Hires sampler", "Hires schedule type"):
        assert name not in pipe.txt2img("a cube", enable_hr=True, hr_prompt="a cube", **options).infotexts[0]


def test_hires_pass_sampler_sets_its_calls_and_bad_names_are_refused(pipe):
    req = GenerationRequest(prompt="a", steps=4, sampler="Euler", hires=HiresOptions(sampler="Heun"))
    assert hires.pass_calls(req) == (4, 8)
    req = dataclasses.replace(req, sampler="Heun", hires=HiresOptions(sampler="Use same sampler"))
    assert hires.pass_calls(req) == (8, 8)
    for options, message in (
        (dict(hr_sampler_name="Euler z"), "hr_sampler_name: unknown sampler 'Euler z'"),
        (dict(hr_scheduler="Karras-ish"), "hr_scheduler: unknown schedule 'Karras-ish'"),
        (dict(hr_prompt="(" * 500), "hr_prompt"),
        (dict(hr_prompt="a cube <lora:other:1>"), "hr_prompt names other networks"),
    ):
        with pytest.raises(RequestError, match=message.replace("(", r"\(")):
            pipe.txt2img("a cube", **{**BASE, "enable_hr": True, **options})


def test_cli_hires_pass_of_its_own_round_trips(model, tmp_path):
    out, again = tmp_path / "hr.png", tmp_path / "again.png"
    args = ["txt2img", "a cube", "-m", str(model), "--seed", "4", "--steps", "3", "-W", "64", "-H", "64", "-q"]
    own = ["--hires-prompt", "a sphere, red", "--hires-sampler", "Euler a", "--hires-schedule", "exponential"]
    assert main([*args, "--hires", "1.5", *own, "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert 'Hires prompt: "a sphere, red"' in text and "Hires schedule type: Exponential" in text
    assert main(["txt2img", "--from", str(out), "-m", str(model), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("DPM++ 2M SDE Karras", "automatic", "karras"),  # named, and not that sampler's default: kept
        ("Euler Karras", "automatic", "karras"),
        ("DPM++ 2M Karras", "automatic", "normal"),  # Karras is DPM++ 2M's default: Automatic, Euler a's own
        ("DPM++ 2M", "exponential", "exponential"),  # the request's schedule
    ],
)
def test_hires_pass_keeps_the_schedule_a1111s_api_keeps(sampler, schedule, expected):
    """A1111 1.9+'s API splits "DPM++ 2M SDE Karras" into sampler and scheduler (get_sampler_and_scheduler,
    which turns a sampler's own default back into Automatic), and the hires pass takes that scheduler
    when hr_scheduler is unset; here with hr_sampler_name "Euler a" (default schedule: normal)."""
    from latentforge.pipelines.checks import hires_request
    from latentforge.sampling.registry import resolve

    req = GenerationRequest(sampler=sampler, schedule=schedule, hires=HiresOptions(sampler="Euler a"))
    second = hires_request(req)
    assert resolve(second.sampler, second.schedule) == (resolve("Euler a")[0], expected)


def test_hires_fields_none_is_the_first_pass_and_a_prompt_of_tags_is_empty(pipe):
    """A1111's Python defaults are None (the first pass's); an hr_prompt of network tags alone is the empty
    prompt once the tags are cut, as A1111 conditions on it."""
    none = dict(hr_prompt=None, hr_negative_prompt=None, hr_sampler_name=None, hr_scheduler=None)
    req = GenerationRequest.from_dict({"prompt": "a cube", "enable_hr": True, **none})
    assert (req.hires.prompt, req.hires.sampler) == ("", "")
    options = {**BASE, "enable_hr": True, "hr_scale": 1.5}
    same = pipe.txt2img("a cube", **none, **options).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(pipe.txt2img("a cube", **options).images[0]))
    empty = pipe.txt2img("a cube", hr_prompt=" ", **options).images[0]
    assert not np.array_equal(np.asarray(empty), np.asarray(same))
    with pytest.raises(RequestError, match="hr_prompt names other networks"):  # checked before any loading
        GenerationRequest(prompt="a", hires=HiresOptions(prompt="b <lora:x:1>")).validate()
    tagged = GenerationRequest(prompt="a <lora:x:1>", hires=HiresOptions(prompt="<lora:x:1>"))
    assert hires_prompt_without_tags(tagged) == " "  # the empty prompt, not "the same as the first pass"


def hires_prompt_without_tags(req):
    from latentforge.conditioning.prompt import extract_network_tags
    from latentforge.pipelines.networks import _hires_without_tags

    return _hires_without_tags(req, extract_network_tags(req.prompt)[1]).prompt


def test_cli_hires_options_without_hires_are_an_error(model, tmp_path, capsys):
    args = ["txt2img", "a cube", "-m", str(model), "--steps", "1", "-W", "64", "-H", "64", "-q"]
    assert main([*args, "--hires-prompt", "a sphere", "-o", str(tmp_path / "x.png")]) == 2
    assert "--hires-prompt set(s) the hires pass; add --hires FACTOR" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sde_hires_pass_draws_from_trees_over_the_whole_schedule(pipe, monkeypatch):
    """A1111's sample_img2img gives create_noise_sampler the whole schedule (sigmas, not sigma_sched): the
    Brownian trees span its smallest positive sigma to its largest, not only the steps that run."""
    import sys

    from latentforge.sampling import NoiseSchedule

    generate = sys.modules["latentforge.pipelines.generate"]  # (the package exports a function of that name)
    ranges = []
    original = generate.BrownianNoise

    def spy(seeds, shape, lo, hi, **kwargs):
        ranges.append((float(lo), float(hi)))
        return original(seeds, shape, lo, hi, **kwargs)

    monkeypatch.setattr(generate, "BrownianNoise", spy)
    pipe.txt2img("a cube", enable_hr=True, hr_scale=1.5, **{**BASE, "sampler": "DPM++ 2M SDE", "schedule": "Karras"})
    full = NoiseSchedule().sigmas  # the model's training sigmas: Karras spans their ends
    (first_lo, first_hi), (hires_lo, hires_hi) = ranges
    assert hires_hi == pytest.approx(float(full.max()), rel=1e-4) and hires_lo == pytest.approx(first_lo)
    assert first_hi == pytest.approx(hires_hi)


def _a1111_resize_image(image: Image.Image, upscale_step, w: int, h: int) -> Image.Image:
    """A1111's images.resize_image(0, im, w, h, upscaler_name) with an upscaler whose do_upscale is
    ``upscale_step(img, scale)``: Upscaler.upscale (dest = the scaled size // 8 * 8, at most 3 steps while
    smaller, Lanczos to dest), then Lanczos to (w, h)."""
    lanczos = Image.Resampling.LANCZOS
    scale = max(w / image.width, h / image.height)
    if scale > 1.0:
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        for _ in range(3):
            if image.width >= dest_w and image.height >= dest_h:
                break
            shape = (image.width, image.height)
            image = upscale_step(image, scale)
            if shape == (image.width, image.height):
                break
        if image.width != dest_w or image.height != dest_h:
            image = image.resize((dest_w, dest_h), resample=lanczos)
    if image.width != w or image.height != h:
        image = image.resize((w, h), resample=lanczos)
    return image


@pytest.mark.parametrize(
    ("name", "filt"), [("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)]
)
@pytest.mark.parametrize("target", [(83, 83), (128, 96), (676, 665), (60, 60)])
def test_image_upscalers_resize_as_a1111(name, filt, target):
    """For a target that is not a multiple of 8, A1111's Lanczos upscaler makes three resizes (by the scale,
    to the multiple of 8 below, to the target) and the nearest one ends with Lanczos; no enlargement is
    Lanczos alone."""
    from latentforge.pipelines.hires import a1111_resize

    rng = np.random.default_rng(sum(target))
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def step(img, scale):  # A1111's UpscalerLanczos / UpscalerNearest do_upscale
        return img.resize((int(img.width * scale), int(img.height * scale)), resample=filt)

    expected = _a1111_resize_image(image, step, *target)
    assert np.array_equal(np.asarray(a1111_resize(image, name, *target)), np.asarray(expected))


def test_hires_encodes_the_unrounded_target_as_a1111(pipe, monkeypatch):
    """hr_scale 1.3 from 64 px: A1111's target is int(64 * 1.3) = 83 px; its image upscaler's result is
    encoded at 83x83 (the latent is 10x10, as for the 80 px the output has)."""
    seen = []
    original = pipe.vae.encode

    def spy(image, *args, **kwargs):
        seen.append(tuple(image.shape[-2:]))
        return original(image, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", spy)
    result = pipe.txt2img("a cube", enable_hr=True, hr_scale=1.3, hr_upscaler="Lanczos", **BASE)
    assert seen == [(83, 83)] and result.images[0].size == (80, 80)


@pytest.mark.parametrize(
    ("size", "resize", "upscale_to", "final"),
    [((512, 512), (1024, 768), (1024, 1024), (1024, 768)), ((512, 768), (1000, 1000), (1000, 1500), (1000, 1000)),
     ((768, 512), (800, 800), (1200, 800), (800, 800)), ((512, 512), (1024, 0), (1024, 1024), (1024, 1024))],
)  # fmt: skip
def test_both_hires_sizes_cover_then_crop_as_a1111(size, resize, upscale_to, final):
    """A1111's calculate_target_resolution with hr_resize_x and hr_resize_y: ``if src_ratio < dst_ratio:
    hr_upscale_to_x = hr_resize_x; hr_upscale_to_y = hr_resize_x * height // width`` (else the other way),
    ``truncate_x = (hr_upscale_to_x - target_w) // opt_f`` (and y); the latents are cut by those after the
    upscale, half on each side. (1000 is not a multiple of 8: the 125-column latent keeps 1000 px.)"""
    from latentforge.pipelines.hires import crop, target_pixels, target_size

    req = GenerationRequest(prompt="a", hires=HiresOptions(resize_x=resize[0], resize_y=resize[1]))
    assert target_pixels(req, *size) == upscale_to
    tx, ty = crop(req, *size)
    if resize[1]:
        assert (tx, ty) == ((upscale_to[0] - resize[0]) // 8, (upscale_to[1] - resize[1]) // 8)
    assert target_size(req, *size) == ((upscale_to[0] // 8 - tx) * 8, (upscale_to[1] // 8 - ty) * 8) == final


def test_both_hires_sizes_crop_the_upscaled_latents(pipe, monkeypatch):
    """64x64 to hr 128x96: the latents are upscaled to 16x16 (covering), then rows 2..14 kept (truncate_y 4)."""
    seen = _spy_first_pass(monkeypatch)
    hires_input = []
    original = hires.upscale

    def keep(*args, **kwargs):
        out = original(*args, **kwargs)
        hires_input.append(out)
        return out

    monkeypatch.setattr(hires, "upscale", keep)
    result = pipe.txt2img("a cube", enable_hr=True, hr_resize_x=128, hr_resize_y=96, **BASE)
    assert result.images[0].size == (128, 96) and "Hires resize: 128x96" in result.infotexts[0]
    assert hires_input[0].shape[-2:] == (16, 16) and seen["first"].shape[-2:] == (8, 8)


def test_a_crop_from_an_oversized_cover_is_refused():
    """512x1024 to hr 8000x64: A1111 would upscale to 8000x16000 and cut 64 rows; over 8192 px a side is
    refused before any work (the server's pixel limit counts the cover too)."""
    from latentforge.pipelines.hires import target_size

    req = GenerationRequest(prompt="a", hires=HiresOptions(resize_x=8000, resize_y=64))
    with pytest.raises(RequestError, match="cut from 8000x16000"):
        target_size(req, 512, 1024)
    assert target_size(req, 8000, 64) == (8000, 64)


def test_fixed_steps_are_bounded_and_fit_short_schedules():
    """A tiny strength would make a vast schedule (1000 steps at 1e-9: 10^12 sigmas): refused. Schedules that
    make fewer sigmas than asked (LCM's at most 50 steps) run all they have rather than none."""
    from latentforge.pipelines.hires import hires_schedule
    from latentforge.sampling import NoiseSchedule
    from latentforge.sampling.registry import resolve

    info, _ = resolve("Euler")
    with pytest.raises(RequestError, match="schedule of 999999999999 steps; at most 10000"):
        hires_schedule(info, "normal", NoiseSchedule(), 1000, 1e-9)
    full, running = hires_schedule(info, "lcm", NoiseSchedule(), 8, 0.1)
    assert len(full) - 1 < 80 and len(running) == 9 and torch.equal(running, full[-9:])
