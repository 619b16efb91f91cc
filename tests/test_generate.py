"""Generation: seeds, metadata round trips, --from, bad input, CLI outputs."""

from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.io.infotext import format_infotext, parse_infotext
from latentforge.pipelines import GenerationRequest, RequestError
from latentforge.pipelines.metadata import read_png_metadata, request_from_infotext
from latentforge.sampling.noise import ImageNoise
from latentforge.sampling.schedules import SCHEDULES, schedule_name
from tiny import build_reference, save_folder

SMALL = dict(width=64, height=64, steps=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_folder(build_reference("sd1", seed=40), tmp_path_factory.mktemp("gen") / "model")


@pytest.fixture(scope="module")
def pipe(model):
    return latentforge.load(model)


def test_seed_semantics(pipe):
    result = pipe.txt2img("a cube", seed=-1, batch_size=2, batch_count=2, **SMALL)
    first = result.seeds[0]
    assert 0 <= first < 2**32 and result.seeds == [first, first + 1, first + 2, first + 3]
    assert result.request.seed == first and f"Seed: {first + 2}," in result.infotexts[2]
    # the starting noise of image i is torch.randn from a CPU generator seeded with seed + i
    noise = ImageNoise([5, 6], (4, 8, 8)).next()
    for i, s in enumerate((5, 6)):
        assert torch.equal(noise[i], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)))


def test_same_seed_same_image_and_batch_position_does_not_matter(pipe):
    a = pipe.txt2img("a cube", seed=10, sampler="Euler a", **SMALL).images[0]
    b = pipe.txt2img("a cube", seed=10, sampler="Euler a", **SMALL).images[0]
    c = pipe.txt2img("a cube", seed=9, batch_size=2, sampler="Euler a", **SMALL).images[1]  # seed 9 + 1
    d = pipe.txt2img("a cube", seed=11, sampler="Euler a", **SMALL).images[0]
    a, b, c, d = (np.asarray(i, dtype=np.int16) for i in (a, b, c, d))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() <= 1  # same seed in another batch position: same image up to float order
    assert np.abs(a - d).max() > 10


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_generates_and_is_read_back_from_its_infotext(pipe, name):
    """linear_quadratic was accepted by validation and ran every step, then the infotext had no title
    for it: a KeyError after the work (a 500 from the server)."""
    result = pipe.txt2img("a cube", seed=3, schedule=name, **SMALL)
    again = request_from_infotext(result.infotexts[0])[0]
    assert schedule_name(again.schedule) == name, result.infotexts[0]


def test_align_your_steps_is_named_in_the_infotext_and_read_back(pipe):
    result = pipe.txt2img("a cube", seed=3, schedule="Align Your Steps", **SMALL)
    assert "Schedule type: Align Your Steps" in result.infotexts[0]
    assert request_from_infotext(result.infotexts[0])[0].schedule.lower() == "align your steps"
    other = pipe.txt2img("a cube", seed=3, schedule="karras", **SMALL).images[0]
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(other))


def test_infotext_round_trip_and_a1111_text():
    text = format_infotext(
        "a cat, (fluffy:1.2)\nsecond line",
        "blurry",
        {
            "Steps": 20,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 7,
            "Seed": 1,
            "Size": "512x768",
            "Lora hashes": "detail: abc123, style: def456",
            "Version": "v1.10.1",
        },
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "a cat, (fluffy:1.2)\nsecond line" and negative == "blurry"
    assert params["Lora hashes"] == "detail: abc123, style: def456" and params["Size"] == "512x768"
    # written by hand in A1111's format (reference notes, interop.md)
    a1111 = (
        "masterpiece, 1girl\nNegative prompt: lowres, bad hands\nSteps: 28, Sampler: DPM++ 2M, "
        "Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, "
        'Model: v1-5-pruned-emaonly, Clip skip: 2, TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
    )
    req, meta = request_from_infotext(a1111)
    assert (req.prompt, req.negative_prompt) == ("masterpiece, 1girl", "lowres, bad hands")
    assert (req.steps, req.sampler, req.schedule, req.cfg_scale, req.seed) == (
        28,
        "DPM++ 2M",
        "Karras",
        6.5,
        1234567890,
    )
    assert (req.width, req.height, req.clip_skip) == (512, 768, 2)
    assert req.extra["TI hashes"] == "easynegative: c74b4e810b03" and req.extra["Version"] == "v1.10.1"
    assert meta["model"] == {"name": "v1-5-pruned-emaonly", "hash": "6ce0161689"}
    legacy, _ = request_from_infotext("x\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (legacy.sampler, legacy.schedule) == ("DPM++ 2M", "karras")
    assert parse_infotext("just a prompt: with a colon")[2] == {}  # fewer than 3 pairs: not settings


def test_cli_writes_pngs_with_metadata_and_from_reproduces_pixels(model, tmp_path, capsys):
    outdir = tmp_path / "out"
    args = [
        "txt2img",
        "a red cube",
        "-m",
        str(model),
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "4",
        "--seed",
        "77",
        "--batch-size",
        "2",
        "--sampler",
        "Euler a",
        "--outdir",
        str(outdir),
        "-q",
    ]
    assert main(args) == 0
    files = sorted(outdir.glob("*.png"))
    assert [f.name for f in files] == ["00000-77.png", "00001-78.png"]
    meta = read_png_metadata(files[1])
    assert "Seed: 78" in meta["parameters"] and meta["latentforge"]["batch_index"] == 1
    again = tmp_path / "again.png"
    assert main(["txt2img", "--from", str(files[1]), "-m", str(model), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(files[1])))
    assert main(args) == 0  # a second run continues the numbering, overwriting nothing
    assert len(list(outdir.glob("*.png"))) == 4 and (outdir / "00002-77.png").is_file()
    assert main(["info", str(files[0])]) == 0
    assert "Sampler: Euler a" in capsys.readouterr().out


def test_cli_img2img(model, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((72, 80, 3)) * 255).astype(np.uint8)).save(init)
    out = tmp_path / "i2i.png"
    assert (
        main(
            [
                "img2img",
                str(init),
                "a blue cube",
                "-m",
                str(model),
                "--steps",
                "4",
                "--strength",
                "0.5",
                "--seed",
                "3",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    image = Image.open(out)
    assert image.size == (80, 72)  # the init image's size, rounded down to multiples of 8
    assert "Denoising strength: 0.5" in image.info["parameters"]
    common = ["img2img", str(init), "a blue cube", "-m", str(model), "--steps", "2", "--seed", "3", "-q"]
    latent = tmp_path / "latent.png"  # resize mode 3: the latent resized (A1111's "Just resize (latent upscale)")
    assert main([*common, "--resize-mode", "3", "-W", "64", "-H", "64", "-o", str(latent)]) == 0
    plain = tmp_path / "plain.png"
    assert main([*common, "--resize-mode", "0", "-W", "64", "-H", "64", "-o", str(plain)]) == 0
    assert Image.open(latent).size == (64, 64)
    assert not np.array_equal(np.asarray(Image.open(latent)), np.asarray(Image.open(plain)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sampler="Eulerr"), "unknown sampler 'Eulerr'. Valid samplers: Euler, Euler a"),
        (dict(steps=0), "steps must be a whole number >= 1"),
        (dict(cfg_scale=math.nan), "cfg_scale must be a finite number"),
        (dict(cfg_scale=math.inf), "cfg_scale must be a finite number"),
        (dict(width=100), "width must be a multiple of 8"),
        (dict(height=63), "height must be a multiple of 8"),
        (dict(schedule="weird"), "unknown schedule 'weird'"),
        (dict(seed=-5), "seed must be -1 (random) or a whole number from 0 to 2^64 - 1, got -5"),
    ],
)
def test_bad_requests_are_refused_before_any_work(pipe, options, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        pipe.txt2img("x", **{**SMALL, **options})


@pytest.mark.parametrize("strength", [-0.1, 1.5, math.nan])
def test_strength_outside_0_1_is_refused(pipe, strength):
    with pytest.raises(RequestError, match="denoising_strength must be between 0 and 1"):
        pipe.img2img(Image.new("RGB", (64, 64)), "x", denoising_strength=strength, **SMALL)


def test_unreadable_init_image_and_nothing_written(model, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "out.png"
    code = main(["img2img", str(bad), "x", "-m", str(model), "--steps", "2", "-o", str(out), "-q"])
    assert code == 2 and "cannot read init image" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    code = main(["txt2img", "x", "-m", str(model), "-W", "65", "-o", str(out), "-q"])
    assert code == 2 and "multiple of 8" in capsys.readouterr().err and not out.exists()
    with pytest.raises(RequestError, match="unknown request field"):
        GenerationRequest.from_dict({"prompt": "x", "stpes": 3})


def test_every_sampler_runs_through_the_pipeline(pipe):
    from latentforge.sampling import SAMPLERS

    for info in SAMPLERS:
        image = pipe.txt2img("a cube", sampler=info.title, seed=1, **SMALL).images[0]
        assert np.asarray(image).std() > 0, info.title


def test_an_interrupted_run_can_return_the_image_being_made(pipe):
    """A1111's interrupt and skip keep the image being made: the sampler's last denoised estimate,
    decoded. ``generate(..., partial=True)`` does that (the server uses it); without it Interrupted
    propagates as before."""
    from latentforge.pipelines.generate import Interrupted, generate
    from latentforge.pipelines.images import tensor_to_images

    seen = []

    def stop_at_3(p):
        seen.append(p.denoised.clone())
        if p.step == 3:
            raise Interrupted()

    req = GenerationRequest(prompt="a cube", seed=5, batch_size=2, batch_count=2, steps=6, width=64, height=64)
    with pytest.raises(Interrupted):
        generate(pipe, req, progress=stop_at_3)
    seen.clear()
    result = generate(pipe, req, progress=stop_at_3, partial=True)
    assert len(seen) == 3 and len(result.images) == 2 and result.seeds == [5, 6]  # the first batch only
    with torch.inference_mode():
        expected = tensor_to_images(pipe.vae.decode(seen[-1]))
    for got, want in zip(result.images, expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert len(result.infotexts) == 2 and "Seed: 6," in result.infotexts[1]


def test_sigma_settings_sgm_noise_and_ddim_eta_are_in_the_infotext_as_a1111_writes_them(pipe):
    """A1111 writes "Sigma churn/tmin/tmax/noise" when not their defaults, "SGM noise multiplier: True",
    and DDIM's eta as "Eta DDIM" (sd_samplers_kdiffusion / sd_samplers_timesteps). latentforge left the
    first two out, so an image made with them came back different from its infotext alone, and
    refused A1111's own fields."""
    made = pipe.txt2img("a cube", seed=4, sampler="Euler", s_churn=0.5, s_noise=0.9, sgm_noise_multiplier=True,
                        **SMALL)  # fmt: skip
    text = made.infotexts[0]
    for field in ("Sigma churn: 0.5", "Sigma noise: 0.9", "SGM noise multiplier: True"):
        assert field in text, text
    assert "Sigma tmin" not in text and "Sigma tmax" not in text  # their defaults
    again = pipe.txt2img(request=request_from_infotext(text)[0])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(made.images[0]))
    ddim = pipe.txt2img("a cube", seed=4, sampler="DDIM", eta=0.3, **SMALL)
    assert "Eta DDIM: 0.3" in ddim.infotexts[0] and "Eta: " not in ddim.infotexts[0]
    req = request_from_infotext("a cube\nSteps: 4, Sampler: DDIM, Eta DDIM: 0.3, Seed: 4, Size: 64x64")[0]
    assert req.eta == 0.3 and not req.extra


def test_a_device_this_machine_lacks_is_one_clear_error(tmp_path, capsys):
    """--device cuda on a CPU build ended in torch's AssertionError traceback (exit 1)."""
    from latentforge.device import parse_device

    assert parse_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        parse_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available with this PyTorch build on this machine"):
            latentforge.load(tmp_path / "nothing.safetensors", device="cuda")  # before any file is read
        assert main(["txt2img", "x", "--device", "cuda", "-o", str(tmp_path / "a.png")]) == 2
        assert "not available" in capsys.readouterr().err


def test_save_image_keeps_the_infotext_as_the_readme_shows(pipe, tmp_path):
    result = pipe.txt2img("a cube", seed=2, **SMALL)
    path = latentforge.save_image(result.images[0], tmp_path / "out.png")
    assert read_png_metadata(path)["parameters"] == result.infotexts[0]


def test_img2img_noise_multiplier_scales_the_starting_noise_as_a1111(pipe, model, monkeypatch, tmp_path):
    """A1111 (processing.py, img2img ``sample``): the noise is multiplied by ``initial_noise_multiplier``
    before the sampler adds it, so the start is init + m * noise * sigma_0; "Noise multiplier" is written
    in the infotext when it is not 1 and read back. It was refused before."""
    gen = importlib.import_module("latentforge.pipelines.generate")  # the module, not the function
    starts = []
    original = gen.starting_latent

    def spy(p, init, noise):
        x = original(p, init, noise)
        starts.append((init.clone(), x.clone()))
        return x

    monkeypatch.setattr(gen, "starting_latent", spy)
    image = Image.new("RGB", (64, 64), (200, 60, 30))
    options = dict(seed=3, steps=4, sampler="Euler", denoising_strength=0.6, width=64, height=64)
    runs = {m: pipe.img2img(image, "a cube", initial_noise_multiplier=m, **options) for m in (1.0, 0.5, 0.0)}
    (init, x1), (_, x_half), (_, x0) = starts
    torch.testing.assert_close(x_half - init, 0.5 * (x1 - init), rtol=1e-5, atol=1e-5)
    assert torch.equal(x0, init)
    assert "Noise multiplier" not in runs[1.0].infotexts[0]
    text = runs[0.5].infotexts[0]
    assert "Noise multiplier: 0.5" in text
    assert request_from_infotext(text)[0].initial_noise_multiplier == 0.5
    assert not np.array_equal(np.asarray(runs[0.5].images[0]), np.asarray(runs[1.0].images[0]))
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    image.save(source)
    args = ["img2img", str(source), "a cube", "-m", str(model), "--seed", "3", "--steps", "4", "-q"]
    assert main([*args, "--sampler", "Euler", "--strength", "0.6", "--noise-multiplier", "0.5", "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(runs[0.5].images[0]))
    with pytest.raises(RequestError, match="initial_noise_multiplier must be between 0 and 10"):
        pipe.img2img(image, "a cube", initial_noise_multiplier=-1, **options)


def test_several_init_images_make_the_batch_as_a1111(pipe):
    """A1111's img2img init: one image is repeated over the batch; several (at most batch_size) make the batch,
    ``self.batch_size = len(imgs)``; more is an error ("bad number of images passed")."""
    rng = np.random.default_rng(4)
    a, b, c = (Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(3))
    options = dict(steps=2, width=64, height=64, seed=9, denoising_strength=0.6)
    both = pipe.img2img([a, b], "a cube", batch_size=4, **options)
    assert len(both.images) == 2 and both.seeds == [9, 10] and both.request.batch_size == 2
    alone = pipe.img2img(b, "a cube", **{**options, "seed": 10}).images[0]
    diff = np.abs(np.asarray(both.images[1], dtype=int) - np.asarray(alone, dtype=int))
    assert diff.max() <= 1  # image 1: the second init image with seed + 1 (batched arithmetic aside)
    with pytest.raises(RequestError, match="3 init images for a batch_size of 2"):
        pipe.img2img([a, b, c], "a cube", batch_size=2, **options)


def test_img2img_fix_steps_runs_exactly_the_steps_as_a1111(pipe):
    """A1111's img2img_fix_steps setting: setup_img2img_steps' fixed branch, a schedule of int(4 / 0.5) = 8
    steps whose last 4 run; plain img2img with 8 steps and strength 3.5 / 8 (t_enc 3) runs the same."""
    init = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    options = dict(width=64, height=64, seed=5, sampler="Euler")
    fixed = pipe.img2img(init, "a cube", steps=4, denoising_strength=0.5, img2img_fix_steps=True, **options)
    same = pipe.img2img(init, "a cube", steps=8, denoising_strength=3.5 / 8, **options)
    plain = pipe.img2img(init, "a cube", steps=4, denoising_strength=0.5, **options)
    assert np.array_equal(np.asarray(fixed.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(fixed.images[0]), np.asarray(plain.images[0]))
