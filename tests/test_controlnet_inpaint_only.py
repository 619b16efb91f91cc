"""The ControlNet extension's ``inpaint_only`` module (sd-webui-controlnet scripts/hook.py and controlnet.py).

Outside img2img inpainting it holds the unmasked area to the unit's image: after every UNet call the
noise prediction becomes ``x0 = sqrt(1/a) x_t - sqrt(1/a - 1) eps`` (``a``: alphas_cumprod at the rounded
timestep), ``x0`` takes the VAE latent of the unit's image outside the mask max-pooled to latent size
(10 x 10, stride 8, padding 1), and the noise is predicted back, ``eps * w + eps_unet * (1 - w)``; each
decoded image in [0, 1] then keeps the unit's image outside the mask dilated (7 x 7) and box-blurred
(7 x 7). In img2img with A1111's own mask it runs as ``inpaint``. The reference here is diffusers'
StableDiffusionControlNetPipeline on the same weights with those steps written in from the extension's text."""

from __future__ import annotations

import cv2
import diffusers as D
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import latentforge
from latentforge.adapters.controlnet import ControlledDenoiser, Restore
from test_controlnet_inpaint import _img2img_plan
from tiny import build_reference, diffusers_controlnet, hf_tokenizer, save_folder

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn_inpaint_only")
    ref = build_reference("sd1", seed=21)
    net, path = diffusers_controlnet(ref, tmp)
    return ref, net, latentforge.load(save_folder(ref, tmp / "m")), path, hf_tokenizer("<|endoftext|>", tmp)


def _image() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + np.random.default_rng(2).normal(0, 20, (64, 64, 3))
    return rgb.clip(0, 255).astype(np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((64, 64), np.uint8)
    m[16:40, 20:52] = 255
    return m


def test_txt2img_inpaint_only_matches_the_extension_on_diffusers(setup):
    ref, net, ours, path, tok = setup
    image, mask = _image(), _mask()
    weight, steps, seed, prompt = 0.8, 8, 77, "a red cube"
    feed = torch.from_numpy(np.concatenate([image, mask[:, :, None]], axis=2) / 255.0).float().permute(2, 0, 1)[None]
    c, m = feed[:, :3], (feed[:, 3:] > 0.5).float()
    hint = c * (1 - m) - m  # hook.py's inpaint protocol
    with torch.no_grad():
        origin = ref.vae.encode(c * 2 - 1).latent_dist.mean * ref.vae.config.scaling_factor
    pooled = F.max_pool2d(feed[:, 3:], (10, 10), stride=(8, 8), padding=1)
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    unet_forward = ref.unet.forward

    def held(sample, timestep, *args, **kwargs):  # the extension's restore after the UNet
        out = unet_forward(sample, timestep, *args, **kwargs)
        eps = out[0] if isinstance(out, tuple) else out.sample
        a = alphas[torch.round(torch.as_tensor(timestep).float()).long()]
        x0 = (1 / a).sqrt() * sample - (1 / a - 1).sqrt() * eps
        x0 = x0 * pooled + origin * (1 - pooled)
        back = ((1 / a).sqrt() * sample - x0) / (1 / a - 1).sqrt()
        eps = back * weight + eps * (1 - weight)
        return (eps,) if isinstance(out, tuple) else D.models.unets.unet_2d_condition.UNet2DConditionOutput(eps)

    pipe = D.StableDiffusionControlNetPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, net,
        D.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"), None, None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    ref.unet.forward = held
    try:
        decoded = pipe(
            prompt, image=hint, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
            controlnet_conditioning_scale=weight, generator=torch.Generator().manual_seed(seed), output_type="pt",
        ).images  # fmt: skip
    finally:
        del ref.unet.forward
    post = cv2.blur(cv2.dilate(mask.astype(np.float32) / 255, np.ones((7, 7), np.uint8)), (7, 7))
    post = torch.from_numpy(post)[None, None]
    theirs = (post * decoded.clamp(0, 1) + (1 - post) * c).clamp(0, 1)[0].permute(1, 2, 0).numpy()

    unit = {
        "model": str(path),
        "module": "inpaint_only",
        "weight": weight,
        "image": (Image.fromarray(image), Image.fromarray(mask)),
    }
    result = ours.txt2img(
        prompt, steps=steps, cfg_scale=7.0, width=64, height=64, seed=seed, sampler="Euler", schedule="normal",
        control=[unit],
    )  # fmt: skip
    mine = np.asarray(result.images[0], dtype=np.float32) / 255
    assert np.abs(mine - theirs).max() <= 2 / 255 + 1e-6, np.abs(mine - theirs).max() * 255
    assert "Module: inpaint_only" in result.infotexts[0]
    # the hold matters: without it (inpaint_global_harmonious) the unmasked area drifts from the image
    plain = ours.txt2img(
        prompt, steps=steps, cfg_scale=7.0, width=64, height=64, seed=seed, sampler="Euler", schedule="normal",
        control=[{**unit, "module": "inpaint_global_harmonious"}],
    )  # fmt: skip
    outside = post[0, 0].numpy() == 0
    far = np.abs(np.asarray(plain.images[0], dtype=np.float32) / 255 - image / 255)[outside].mean()
    # outside the blurred mask the unit's image comes back byte for byte (the blend runs before the truncation)
    assert np.array_equal(np.asarray(result.images[0])[outside], image[outside]) and far > 1 / 255


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_restore_keeps_the_image_latent_outside_the_mask(prediction):
    g = torch.Generator().manual_seed(0)
    x_t, out, latent = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    t = torch.tensor([500.3, 500.3])
    a = alphas[500]
    got = Restore(latent, mask, 1.0)(out, x_t, t, alphas, prediction)

    def x0_of(pred):  # each prediction's own relation to x0 (eps: x_t = sqrt(a) x0 + sqrt(1 - a) eps)
        if prediction == "eps":
            return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * pred

    inside = mask.expand_as(x_t).bool()
    assert torch.allclose(x0_of(got)[~inside], latent.expand_as(x_t)[~inside], atol=1e-4)
    assert torch.allclose(got[inside], out[inside], atol=1e-4)  # the masked area predicts as the UNet did
    half = Restore(latent, mask, 0.25)(out, x_t, t, alphas, prediction)
    assert torch.allclose(half, 0.25 * got + 0.75 * out, atol=1e-5)
    over = Restore(latent, mask, 3.0)(out, x_t, t, alphas, prediction)  # weight clipped to [0, 1]
    assert torch.allclose(over, got)


def test_inpaint_only_with_img2img_mask_runs_as_inpaint(setup):
    """The extension: "A1111 inpaint and ControlNet inpaint duplicated. Falls back to
    inpaint_global_harmonious." (img2img with A1111's mask): no hold, the same hint as inpaint."""
    _, _, ours, path, _ = setup
    image, mask = _image(), _mask()
    request = dict(mask=Image.fromarray(mask), denoising_strength=0.5, mask_blur=0)
    units = {}
    for module in ("inpaint_only", "inpaint_global_harmonious"):
        plan = _img2img_plan(ours, {"model": str(path), "module": module}, Image.fromarray(image), **request)
        units[module] = [p.model for p in plan.passes if isinstance(p.model, ControlledDenoiser)]
    (only,), (harmonious,) = units["inpaint_only"], units["inpaint_global_harmonious"]
    assert not only.restores and torch.equal(only.units[0].hint, harmonious.units[0].hint)
    own = {"model": str(path), "module": "inpaint_only", "image": (Image.fromarray(image), Image.fromarray(mask))}
    plan = _img2img_plan(ours, own, Image.fromarray(image), denoising_strength=0.5)
    held = [p.model for p in plan.passes if isinstance(p.model, ControlledDenoiser)]
    assert held and held[0].restores  # img2img without a mask: the hold runs
