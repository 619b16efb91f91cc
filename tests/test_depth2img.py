"""Depth-to-image with a given depth map, against diffusers' StableDiffusionDepth2ImgPipeline."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers as D
import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.pipelines import RequestError
from latentforge.pipelines.images import image_to_tensor
from tiny import build_reference, hf_tokenizer, save_folder

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _photo() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))


def _depth() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    return (np.sin(x / 9.0) + np.cos(y / 7.0) + 3) * 40  # smooth, not flat, arbitrary scale


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("depth")
    ref = build_reference("sd2-depth", seed=90)
    return ref, latentforge.load(save_folder(ref, tmp / "m"), dtype="fp32"), hf_tokenizer("!", tmp)


def test_depth2img_with_a_given_map_matches_diffusers(model):
    ref, ours, tok = model
    init, depth = _photo(), _depth()
    pipe = D.StableDiffusionDepth2ImgPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"),
        None, None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    encode = ref.vae.encode  # diffusers samples the posterior with the generator; use its mean, as we do

    def mean_encode(x, *args, **kwargs):
        mean = encode(x).latent_dist.mean
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: mean, mode=lambda: mean))

    pipe.vae.encode = mean_encode
    theirs = pipe(
        "a cube", image=image_to_tensor(init), depth_map=torch.from_numpy(depth.astype(np.float32))[None],
        strength=0.6, num_inference_steps=10, guidance_scale=7.0, generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images  # fmt: skip
    result = ours.img2img(
        init, "a cube", depth={"map": depth}, denoising_strength=0.5, steps=10, cfg_scale=7.0, seed=5,
        sampler="Euler", schedule="normal",
    )  # fmt: skip
    diff = np.abs(np.asarray(result.images[0], dtype=np.float32) / 255 - theirs[0])
    assert diff.max() <= 2 / 255 + 1e-6, diff.max() * 255
    # the map matters: another one gives another image
    other = ours.img2img(init, "a cube", depth={"map": depth.T}, denoising_strength=0.5, steps=10, seed=5)
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(result.images[0]))


def test_depth_map_from_an_image_file_and_the_cli(model, tmp_path):
    from latentforge.cli import main

    _, ours, _ = model
    d = _depth()
    Image.fromarray((d / d.max() * 255).astype(np.uint8)).save(tmp_path / "depth.png")
    _photo().save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    args = ["img2img", str(tmp_path / "in.png"), "a cube", "-m", ours.info.source, "--depth-map"]
    assert main([*args, str(tmp_path / "depth.png"), "--steps", "3", "--seed", "2", "-q", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_depth_inputs_are_checked(model, tmp_path):
    _, ours, _ = model
    with pytest.raises(RequestError, match="flat"):
        ours.img2img(_photo(), "x", depth={"map": np.ones((64, 64))}, steps=2)
    with pytest.raises(RequestError, match="need their own input \\(a depth map\\)"):
        ours.txt2img("x", steps=2, width=64, height=64)
    sd1 = latentforge.load(save_folder(build_reference("sd1", seed=1), tmp_path / "sd1"))
    with pytest.raises(RequestError, match="not a depth-to-image model"):
        sd1.img2img(_photo(), "x", depth={"map": _depth()}, steps=2)


def test_depth_estimated_by_midas_matches_diffusers_depth_estimator(model, tmp_path):
    """Without a map, the depth comes from MiDaS found in the model folder's depth_estimator/ (a tiny
    DPT-Hybrid), close to what diffusers' pipeline computes with the same network. The two resize the
    image differently (diffusers: PIL bicubic on 8-bit; the original MiDaS transform, which we follow:
    bicubic on floats), so the maps agree closely but not exactly."""
    from transformers import DPTImageProcessorPil

    from latentforge.models.midas import estimate_depth
    from latentforge.models.midas_load import load_midas
    from test_midas import _tiny_hf

    ref, _, tok = model
    hf = _tiny_hf()
    folder = save_folder(ref, tmp_path / "with-depth")
    hf.save_pretrained(folder / "depth_estimator")
    ours = latentforge.load(folder, dtype="fp32")
    init = _photo()
    # the tiny transformers DPT only takes its own 64 px (its position grid is fixed): compare there
    processor = DPTImageProcessorPil(size={"height": 64, "width": 64}, keep_aspect_ratio=False)
    pipe = D.StableDiffusionDepth2ImgPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, D.EulerDiscreteScheduler(**BASE), hf, processor
    )
    with torch.no_grad():
        theirs = pipe.prepare_depth_map(init, None, 1, False, torch.float32, torch.device("cpu"))
        midas = load_midas(folder / "depth_estimator")
        estimated = estimate_depth(midas, (image_to_tensor(init) + 1) / 2, size=(64, 64))
        mine = ours.family.conditioner.depth_concat(estimated, (8, 8))
    assert mine.shape == theirs.shape == (1, 1, 8, 8)
    assert float((mine - theirs).abs().max()) < 0.1
    assert float(torch.corrcoef(torch.stack([mine.flatten(), theirs.flatten()]))[0, 1]) > 0.99
    # end to end: found in depth_estimator/, run at MiDaS' own 384 px
    result = ours.img2img(init, "a cube", steps=3, seed=1, denoising_strength=0.6)
    assert result.images[0].size == (64, 64)


def test_missing_depth_model_says_what_to_get(model):
    _, ours, _ = model
    with pytest.raises(RequestError, match=r"dpt_hybrid-midas-501f0c75\.pt"):
        ours.img2img(_photo(), "x", steps=2)
