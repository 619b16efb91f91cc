"""v-prediction models trained with zero terminal SNR: the rescaled schedule, its detection, and CFG
rescale, against diffusers."""

from __future__ import annotations

import diffusers as D
import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

import latentforge
from latentforge.sampling import NoiseSchedule
from latentforge.sampling.schedules import ZTSNR_LAST_ALPHA_BAR
from tiny import build_reference, hf_tokenizer, save_folder


def test_zero_terminal_snr_schedule_matches_diffusers():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    theirs = torch.cumprod(1 - diffusers_rescale(betas), dim=0)
    ours = NoiseSchedule(zero_terminal_snr=True).alphas_cumprod
    torch.testing.assert_close(ours[:-1], theirs[:-1], rtol=1e-9, atol=1e-12)
    assert float(theirs[-1]) == 0.0 and float(ours[-1]) == ZTSNR_LAST_ALPHA_BAR  # finite sigma_max, as ComfyUI
    assert 4000 < NoiseSchedule(zero_terminal_snr=True).sigma_max < 5000
    assert float(ours[0]) == float(NoiseSchedule().alphas_cumprod[0])


def test_the_file_says_zero_terminal_snr(tmp_path):
    ref = build_reference("sd2-v", seed=4)
    folder = save_folder(ref, tmp_path / "m")
    plain = latentforge.load(folder)
    assert not plain.zero_terminal_snr
    single = plain.save(tmp_path / "m.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(single)
    tensors["ztsnr"] = torch.zeros(0)
    tensors["v_pred"] = torch.zeros(0)
    save_file(tensors, tmp_path / "noob.safetensors")
    pipe = latentforge.load(tmp_path / "noob.safetensors")
    assert pipe.zero_terminal_snr and pipe.prediction == "v"
    assert pipe.noise_schedule().sigma_max > 4000
    assert not latentforge.load(tmp_path / "noob.safetensors", zero_terminal_snr=False).zero_terminal_snr


def test_cfg_rescale_matches_diffusers_guidance_rescale(tmp_path):
    ref = build_reference("sd2-v", seed=12)
    ours = latentforge.load(save_folder(ref, tmp_path / "m"))
    sched = D.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        timestep_spacing="linspace",
    )  # fmt: skip
    pipe = D.StableDiffusionPipeline(
        ref.vae, ref.text_encoders[0], hf_tokenizer("!", tmp_path), ref.unet, sched, None, None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=8, guidance_scale=7.0, height=64, width=64, output_type="np")
    theirs = pipe("a cube", guidance_rescale=0.7, generator=torch.Generator().manual_seed(3), **kwargs).images
    plain = pipe("a cube", generator=torch.Generator().manual_seed(3), **kwargs).images
    options = dict(steps=8, cfg_scale=7.0, width=64, height=64, seed=3, sampler="Euler", schedule="normal")
    result = ours.txt2img("a cube", guidance_rescale=0.7, sgm_noise_multiplier=True, **options)
    got = np.asarray(result.images[0], dtype=np.float32) / 255
    assert np.abs(got - theirs[0]).max() <= 2 / 255 + 1e-6
    assert np.abs(theirs[0] - plain[0]).max() > 4 / 255  # the rescale changed the image
    assert "CFG rescale: 0.7" in result.infotexts[0]
