"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models", arXiv:2406.08070).

CFG++ keeps the guided clean estimate D = D_u + w (D_c - D_u) but re-noises along the *unconditional*
noise: a DDIM step becomes x_next = D + sigma_next * eps_u with eps_u = (x - D_u) / sigma (in sigma
form), instead of eps from the guided estimate. The guided denoiser exposes its last unconditional
estimate (``CFGDenoiser.last_uncond``, read through ``denoisers.last_unconditional``), so these
samplers keep the one signature of ``sampling.samplers``; with no unconditional side (CFG scale 1) D_u
is D and they reduce to their plain counterparts.

``guidance_multiplier`` rescales the guidance of the estimate: D' = D_u + m (D - D_u), i.e. scale w -> m w.
A1111's "DDIM CFG++" uses m = 1 / 12.5 (its CFG scale 0..12.5 maps onto the paper's 0..1); ComfyUI's
``*_cfg_pp`` samplers use the CFG scale as given (m = 1). The rescaling is applied to what the guided
denoiser returns, so under a wrapper that replaces part of the estimate (inpainting's masked blend) the
replaced part is rescaled too; A1111 rescales before its blend. The latents outside the mask then
differ from A1111's during sampling (inpainting puts them back at the end; the masked area sees them
only through the network).
"""

from __future__ import annotations

import math

import torch

from latentforge.sampling.denoisers import last_unconditional
from latentforge.sampling.samplers import _report, ancestral_step, noise_or_default


def _guided(denoise, x, sigma, multiplier: float):
    denoised = denoise(x, sigma)
    uncond = last_unconditional(denoise)
    if multiplier != 1.0:
        denoised = uncond + multiplier * (denoised - uncond)
    return denoised, uncond


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    eta=1.0,
    s_noise=1.0,
    guidance_multiplier=1.0,
    **_,
):
    """CFG++ ancestral Euler / DDIM: x_next = D + sigma_down * eps_u, plus noise of sigma_up (the
    ancestral split with DDIM's eta; eta = 0 is the paper's DDIM CFG++, Algorithm 1)."""
    draw = noise_or_default(noise, x, generator)
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised, uncond = _guided(denoise, x, sigma, guidance_multiplier)
        _report(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        x = denoised + (x - uncond) / sigma * down
        if float(sigmas[i + 1]) > 0 and up > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def sample_euler_cfg_pp(denoise, x, sigmas, **kwargs):
    """ComfyUI's ``euler_cfg_pp``: deterministic CFG++ Euler, x_next = D + sigma_next * eps_u."""
    kwargs.pop("eta", None)
    return sample_euler_ancestral_cfg_pp(denoise, x, sigmas, eta=0.0, **kwargs)


def sample_ddim_cfg_pp(denoise, x, sigmas, *, eta=0.0, guidance_multiplier=1 / 12.5, **kwargs):
    """A1111's "DDIM CFG++": DDIM (eta 0 by default, as A1111's DDIM) with the CFG scale divided by 12.5."""
    return sample_euler_ancestral_cfg_pp(denoise, x, sigmas, eta=eta, guidance_multiplier=guidance_multiplier, **kwargs)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, guidance_multiplier=1.0, **_
):
    """ComfyUI's ``dpmpp_2m_cfg_pp``: DPM-Solver++(2M) whose exponential-integrator step starts from the
    guided estimate and carries the unconditional one: x_next = D + e^-h (x - D_u) - (e^-h - 1) / (2r)
    (D - D_u_prev) with r = h_prev / h (first step and the step into 0 without the last term)."""
    old_uncond = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised, uncond = _guided(denoise, x, sigma, guidance_multiplier)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        x = denoised + math.exp(-h) * (x - uncond)
        if old_uncond is not None:
            r = h_last / h
            x = x - math.expm1(-h) / (2 * r) * (denoised - old_uncond)
        old_uncond, h_last = uncond, h
    return x
