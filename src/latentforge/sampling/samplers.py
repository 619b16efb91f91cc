"""Samplers: small stateless functions with one signature.

    sample_x(denoise, x, sigmas, *, noise=None, callback=None, **options) -> x

``denoise(x, sigma)`` estimates the clean latent; ``x`` starts at noise level ``sigmas[0]`` (k-diffusion
scaling, x = x0 + sigma * eps); ``sigmas`` decreases to 0; ``noise(sigma, sigma_next)`` gives fresh
standard-normal noise shaped like x (seeded, see ``sampling.noise``); ``callback(i, x, sigma, denoised)``
reports each step. This module holds the Euler/Heun/DPM2/LMS family and the DDIM/PLMS/LCM/DDPM
samplers written in the same sigma form; the DPM-Solver++ and UniPC multistep solvers live in
``sampling.dpmsolver``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

Noise = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


def _default_noise(x: Tensor, generator: torch.Generator | None) -> Noise:
    def draw(sigma=None, sigma_next=None):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)

    return draw


def noise_or_default(noise: Noise | None, x: Tensor, generator: torch.Generator | None = None) -> Noise:
    return noise if noise is not None else _default_noise(x, generator)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - denoised) / float(sigma)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: DDIM's eta-scaled variance in sigma form
    (Song et al. 2021): sigma_up = eta * sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down^2 = s'^2 - sigma_up^2."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback(i, x, sigma, denoised)


def _churn(x, sigmas, i, noise, generator, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s stochastic "churn": raise sigma_i by gamma and add the matching noise.
    Returns (x, sigma_hat); gamma = 0 (the default) changes nothing."""
    n = len(sigmas) - 1
    sigma = float(sigmas[i])
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if s_churn > 0:
        # k-diffusion (so A1111) draws in every step, also where s_tmin/s_tmax make gamma 0: the later
        # steps' noise is the same only if those draws are made too (without churn nothing uses them)
        eps = noise_or_default(noise, x, generator)(sigmas[i], sigmas[i + 1])
        if gamma > 0:
            x = x + eps * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    **_,
):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2; churn optional)."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigma_hat, denoised) * (float(sigmas[i + 1]) - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, **_):
    """Euler steps to sigma_down plus fresh noise of sigma_up. With eta = 0 this is DDIM; with eta = 1
    on the DDPM timesteps it is the DDPM posterior (both in sigma form)."""
    draw = noise_or_default(noise, x, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - float(sigmas[i]))
        if float(sigmas[i + 1]) > 0 and up > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_heun(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    **_,
):
    """Heun's method (Karras et al. 2022, Algorithm 2); the last step to sigma 0 is an Euler step."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigmas, i, noise, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = to_d(x2, sigma_next, denoise(x2, sigma_next))
            x = x + (d + d2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


@torch.no_grad()
def sample_dpm_2(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    **_,
):
    """DPM-Solver-2 in Karras et al.'s form: a midpoint step in log sigma; Euler into sigma 0 (churn
    optional, as Euler's)."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        x, sigma = _churn(x, sigmas, i, noise, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        mid = _log_midpoint(sigma, sigma_next)
        x2 = x + d * (mid - sigma)
        x = x + to_d(x2, mid, denoise(x2, mid)) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, **_):
    """DPM-Solver-2 steps to sigma_down plus ancestral noise."""
    draw = noise_or_default(noise, x, generator)
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        d = to_d(x, sigma, denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            mid = _log_midpoint(sigma, down)
            x2 = x + d * (mid - sigma)
            x = x + to_d(x2, mid, denoise(x2, mid)) * (down - sigma)
        if up > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node i - j among nodes
    i, i-1, ..., i-order+1 (linear multistep on a non-uniform grid), integrated exactly."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly *= np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def sample_lms(denoise, x, sigmas, *, noise=None, callback=None, generator=None, order=4, **_):
    """Linear multistep method of order up to 4 on the probability-flow ODE."""
    s = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        ds.append(to_d(x, s[i], denoised))
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(s, cur, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_plms(denoise, x, sigmas, *, noise=None, callback=None, generator=None, **_):
    """Pseudo linear multistep (Liu et al. 2022, PNDM with PLMS steps): Adams-Bashforth on the noise
    prediction, DDIM's transfer step (an Euler step in sigma form), and a pseudo improved-Euler first
    step that costs one extra evaluation."""

    def eps(x_, sigma):
        denoised = denoise(x_, sigma)
        return (x_ - denoised) / float(sigma), denoised

    history: list[Tensor] = []
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        e, denoised = eps(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if i == 0:
            if sigma_next == 0:
                return x + e * (sigma_next - sigma)
            e_next, _ = eps(x + e * (sigma_next - sigma), sigma_next)
            history.append(e)
            x = x + (e + e_next) / 2 * (sigma_next - sigma)
            continue
        history.append(e)
        h = history[-4:]
        if len(h) == 2:
            e_prime = (3 * h[-1] - h[-2]) / 2
        elif len(h) == 3:
            e_prime = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
        else:
            e_prime = (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24
        x = x + e_prime * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_lcm(denoise, x, sigmas, *, noise=None, callback=None, generator=None, **_):
    """Latent consistency sampling (Luo et al. 2023): jump to the denoised estimate, re-noise to the
    next sigma. (diffusers also applies LCM's boundary scalings c_skip/c_out, which differ from 1 and 0
    by less than 1e-5 at the timesteps LCM uses.)"""
    draw = noise_or_default(noise, x, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if float(sigmas[i + 1]) > 0:
            x = x + float(sigmas[i + 1]) * draw(sigmas[i], sigmas[i + 1])
    return x


def sample_ddim(denoise, x, sigmas, *, eta=0.0, **kwargs):
    """DDIM (Song et al. 2021) in sigma form: ancestral Euler with DDIM's eta (0 = deterministic)."""
    return sample_euler_ancestral(denoise, x, sigmas, eta=eta, **kwargs)


def sample_ddpm(denoise, x, sigmas, **kwargs):
    """Ancestral DDPM sampling (Ho et al. 2020, posterior variance beta-tilde): in sigma form exactly
    an ancestral Euler step with eta = 1."""
    kwargs.pop("eta", None)
    return sample_euler_ancestral(denoise, x, sigmas, eta=1.0, **kwargs)


@torch.no_grad()
def sample_heunpp2(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    **_,
):
    """Heun++ (ComfyUI's ``heunpp2``, from the MIT-licensed sd-webui-samplers-scheduler): each step
    averages the slopes at sigma_i, sigma_i+1 and sigma_i+2 (reached by chained Euler steps) with
    weights sigma_i+1 / (3 sigma_0), sigma_i+2 / (3 sigma_0) and the rest for the first; two slopes
    (weights over 2 sigma_0) on the next-to-last step; Euler into the last sigma."""
    s_end = float(sigmas[-1])
    s0 = float(sigmas[0])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigma_hat, denoised)
        s1 = float(sigmas[i + 1])
        dt = s1 - sigma_hat
        if s1 == s_end:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = to_d(x2, s1, denoise(x2, s1))
        s2 = float(sigmas[i + 2])
        if s2 == s_end:
            w2 = s1 / (2 * s0)
            x = x + (d * (1 - w2) + d2 * w2) * dt
            continue
        x3 = x2 + d2 * (s2 - s1)
        d3 = to_d(x3, s2, denoise(x3, s2))
        w2, w3 = s1 / (3 * s0), s2 / (3 * s0)
        x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def _karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(v) for v in (hi + ramp * (lo - hi)) ** rho]


def restart_steps(sigmas, restart_list: dict | None = None) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) Heun steps of A1111's Restart sampler (Xu et al. 2023, "Restart Sampling
    for Improving Generative Processes"). ``restart_list`` maps a sigma to [steps, times, max sigma]:
    after reaching the level nearest that sigma, jump back up to the level nearest ``max sigma`` and
    go down again over ``steps - 1`` Karras-spaced steps, ``times`` times. Without one, A1111's
    choice: from 20 steps, one restart of 9 steps from 0.1 to 2 (from 36 steps, two of steps // 4),
    and the main schedule becomes Karras over the remaining steps between the given ends."""
    levels = [float(s) for s in sigmas]
    steps = len(levels) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            count, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            levels = [*_karras_levels(steps - count * times, levels[-2], levels[0]), 0.0]
            restart_list = {0.1: [count + 1, times, 2.0]}

    def nearest(value: float) -> int:
        return min(range(len(levels)), key=lambda k: (abs(levels[k] - value), k))

    at = {nearest(key): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(levels) - 1):
        pairs.append((levels[i], levels[i + 1]))
        if i + 1 in at:
            count, times, top = at[i + 1]
            top_index = nearest(top)
            if top_index < i + 1:
                restart = _karras_levels(int(count), levels[i + 1], levels[top_index])
                pairs.extend(list(itertools.pairwise(restart)) * int(times))
    return pairs


@torch.no_grad()
def sample_restart(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, s_noise=1.0, restart_list=None, **_
):
    """A1111's Restart sampler: Heun steps along ``restart_steps(sigmas)``; where the next step starts
    above the current sigma, fresh noise lifts x to it (variance sigma_up^2 - sigma^2), the forward
    process of Restart sampling."""
    draw = noise_or_default(noise, x, generator)
    current = None
    for i, (sigma, sigma_next) in enumerate(restart_steps(sigmas, restart_list)):
        if current is not None and current < sigma:
            x = x + draw(current, sigma) * s_noise * math.sqrt(sigma**2 - current**2)
        denoised = denoise(x, sigma)
        _report(callback, i, x, torch.tensor(sigma), denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            x = x + (d + to_d(x2, sigma_next, denoise(x2, sigma_next))) / 2 * dt
        current = sigma_next
    return x
