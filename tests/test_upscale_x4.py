"""The x4 upscaler task against diffusers' StableDiffusionUpscalePipeline on a tiny random-weight model,
the noise augmentation against the DDPM formula, tiled denoising against untiled, and bad input."""

from __future__ import annotations

import diffusers as D
import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.pipelines import RequestError
from latentforge.pipelines.metadata import request_from_image, request_from_infotext
from latentforge.pipelines.upscale_x4 import TiledModel
from latentforge.sampling import ModelDenoiser, NoiseSchedule
from latentforge.sampling.denoisers import Cond
from tiny import build_reference, hf_tokenizer, save_folder

X4_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
PROMPT, NEGATIVE = "a sharp photo of a cat", "blurry"


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("x4")
    ref = build_reference("sd-x4-upscaler", seed=41)
    return ref, latentforge.load(save_folder(ref, tmp / "m")), tmp


def _low_res(w: int = 40, h: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 6) % 256, (y * 7) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("noise_level", [20, 150])
def test_matches_stable_diffusion_upscale_pipeline(x4, noise_level):
    ref, ours, tmp = x4
    seed, image = 1234, _low_res()
    pipe = D.StableDiffusionUpscalePipeline(
        ref.vae,
        ref.text_encoders[0],
        hf_tokenizer("!", tmp / f"t{noise_level}"),
        ref.unet,
        D.DDPMScheduler(**X4_BETAS),
        D.EulerDiscreteScheduler(**X4_BETAS, prediction_type="v_prediction", timestep_spacing="linspace"),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    # our starting noise: the image's seeded CPU generator; the augmentation noise: seed - 10
    latents = torch.randn((1, 4, image.height, image.width), generator=torch.Generator().manual_seed(seed))
    theirs = pipe(
        PROMPT,
        image=image,
        negative_prompt=NEGATIVE,
        num_inference_steps=6,
        guidance_scale=7.0,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(seed - 10),
        latents=latents,
        output_type="np",
    ).images
    result = ours.upscale(
        image,
        PROMPT,
        noise_level=noise_level,
        negative_prompt=NEGATIVE,
        steps=6,
        cfg_scale=7.0,
        seed=seed,
        sampler="Euler",
        schedule="normal",
    )
    assert result.images[0].size == (4 * image.width, 4 * image.height)
    diff = np.abs(np.asarray(result.images[0], dtype=np.float32) / 255.0 - theirs[0])
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel diff {diff.max() * 255:.2f}/255"


def test_noise_augmentation_is_the_ddpm_forward_process(x4):
    """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar from betas linear in sqrt(beta)."""
    _, ours, _ = x4
    image, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    abar = 1.0
    for t in range(21):  # betas of steps 0..20, written out from the schedule's description
        beta = (0.0001**0.5 + t * (0.02**0.5 - 0.0001**0.5) / 999) ** 2
        abar *= 1 - beta
    expected = abar**0.5 * image + (1 - abar) ** 0.5 * noise
    torch.testing.assert_close(ours.family.conditioner.noise_augment(image, 20, noise), expected)
    with pytest.raises(ValueError, match="noise_level must be 0 to 350"):
        ours.family.conditioner.noise_augment(image, 351, noise)


class _LocalNet(torch.nn.Module):
    """A stand-in UNet whose output at a pixel depends on its 3x3 neighbourhood only."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(7, 4, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.3)

    def forward(self, x, t, context, y=None):
        return self.conv(x) + context.mean() + y.float()[:, None, None, None] * 0.01


def test_tiled_denoising_equals_untiled_away_from_seams():
    model = ModelDenoiser(_LocalNet(), NoiseSchedule(0.0001, 0.02), "v")
    x, concat = torch.randn(2, 4, 48, 56), torch.randn(2, 3, 48, 56)
    cond = Cond(torch.randn(2, 5, 8), torch.tensor([20, 20]), concat)
    whole = model(x, 3.0, cond)
    tiled = TiledModel(model, tile=24, overlap=8)(x, 3.0, cond)
    # tiles start every 24 - 8 = 16 pixels, the last one flush with the far edge; a 3x3 stencil sees a tile's
    # zero padding only at a tile's own edge pixels that lie inside the image
    near = torch.zeros(48, 56, dtype=torch.bool)
    for n, axis in ((48, 0), (56, 1)):
        starts = sorted({*range(0, n - 24, 16), n - 24})
        for s0 in starts:
            for edge in (s0, s0 + 23):
                if 0 < edge < n - 1:
                    near[(edge, slice(None)) if axis == 0 else (slice(None), edge)] = True
    torch.testing.assert_close(tiled[..., ~near], whole[..., ~near], atol=1e-5, rtol=1e-5)
    assert (tiled - whole).abs().amax() > 1e-3  # the seams are where tiles differ: the test sees tiling


def test_tiled_upscale_runs_and_stays_close_to_untiled(x4):
    _, ours, _ = x4
    image = _low_res(48, 40)
    options = dict(steps=3, seed=5, sampler="Euler", schedule="normal", cfg_scale=3.0)
    whole = np.asarray(ours.upscale(image, PROMPT, tile=0, **options).images[0], dtype=np.float32)
    tiled_result = ours.upscale(image, PROMPT, tile=32, **options)
    tiled = np.asarray(tiled_result.images[0], dtype=np.float32)
    assert tiled.shape == whole.shape == (160, 192, 3)
    # tiles have their own group-norm statistics, so with random weights the pixels differ; the picture is the same
    corr = np.corrcoef(tiled.ravel(), whole.ravel())[0, 1]
    print(f"tiled vs untiled: correlation {corr:.3f}, mean |diff| {np.abs(tiled - whole).mean():.1f}/255")
    assert corr > 0.8
    assert "X4 tile: 32" in tiled_result.infotexts[0]


def test_infotext_and_record_read_back(x4, tmp_path):
    _, ours, _ = x4
    result = ours.upscale(_low_res(), PROMPT, noise_level=60, steps=2, seed=9)
    req, info = request_from_infotext(result.infotexts[0])
    assert info["mode"] == "upscale-x4" and req.x4.noise_level == 60 and req.width == 160
    path = tmp_path / "out.png"
    from latentforge.io.images import save_png

    save_png(result.images[0], path)
    again, meta = request_from_image(path)
    assert meta["mode"] == "upscale-x4" and again.x4.noise_level == 60
    repeat = ours.upscale(_low_res(), request=again)
    assert np.array_equal(np.asarray(repeat.images[0]), np.asarray(result.images[0]))


def test_bad_input_is_refused_before_any_work(x4, tmp_path):
    _, ours, _ = x4
    with pytest.raises(RequestError, match="larger than 2048 pixels per side"):
        ours.upscale(Image.new("RGB", (2056, 64)), PROMPT, steps=1)
    with pytest.raises(RequestError, match="needs a low-resolution image"):
        ours.upscale([], PROMPT, steps=1)
    with pytest.raises(RequestError, match="noise_level must be a whole number from 0 to 350"):
        ours.upscale(_low_res(), PROMPT, noise_level=400, steps=1)
    with pytest.raises(RequestError, match="cannot read init image"):
        ours.upscale(tmp_path / "missing.png", PROMPT, steps=1)
    sd1 = latentforge.load(save_folder(build_reference("sd1", seed=2), tmp_path / "sd1"))
    with pytest.raises(RequestError, match="needs an sd-x4-upscaler model; the loaded model is sd1"):
        sd1.upscale(_low_res(), PROMPT, steps=1)
    with pytest.raises(RequestError, match="need their own input \\(a low-resolution image\\)"):
        ours.txt2img(PROMPT, steps=1)


def test_cli_upscale_x4_and_from(x4, tmp_path):
    from latentforge.cli import main

    _, ours, _ = x4
    _low_res().save(tmp_path / "small.png")
    model = ours.info.source
    out, again = tmp_path / "big.png", tmp_path / "again.png"
    args = ["upscale-x4", str(tmp_path / "small.png"), "a cat", "-m", model, "--steps", "2", "--seed", "4", "-q"]
    assert main([*args, "--noise-level", "40", "-o", str(out)]) == 0
    assert Image.open(out).size == (160, 128)
    assert (
        main(["upscale-x4", str(tmp_path / "small.png"), "-m", model, "--from", str(out), "-q", "-o", str(again)]) == 0
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "X4 noise level: 40" in Image.open(again).info["parameters"]
