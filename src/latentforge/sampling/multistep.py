"""ComfyUI's extra multistep samplers, in the sigma form and signature of ``sampling.samplers``.

- ``ipndm``: improved PNDM (Zhang and Chen 2023, DEIS paper, Section 5; as in Zhou et al. 2024's AMED
  code): Adams-Bashforth of order up to 4 with the fixed equal-step weights on d = (x - D) / sigma.
- ``deis``: DEIS tAB (Zhang and Chen 2023, arXiv:2204.13902): the slope is interpolated by a Lagrange
  polynomial in the VP time tau of the previous points and integrated over the step in sigma.
- ``res_multistep``: the second-order multistep exponential integrator of RES (Zhang et al. 2023,
  arXiv:2308.02157), optionally ancestral.
- ``er_sde``: ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169), VE form with ComfyUI's noise scale
  function sigma (e^(sigma^0.3) + 10).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from latentforge.sampling.denoisers import last_unconditional
from latentforge.sampling.samplers import _report, ancestral_step, noise_or_default, to_d

_AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_ipndm(denoise, x, sigmas, *, noise=None, callback=None, generator=None, max_order=4, **_):
    """iPNDM: x_next = x + (sigma_next - sigma) * sum_k w_k d_(i-k), the Adams-Bashforth weights of order
    min(i + 1, max_order); the step into sigma 0 returns the denoised estimate."""
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        ds = [*ds, to_d(x, sigma, denoised)][-max_order:]
        if sigma_next == 0:
            x = denoised
            continue
        weights = _AB_WEIGHTS[len(ds)]
        x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, reversed(ds)))
    return x


# ComfyUI fits its VP time to EDM's range (sigma 0.002 .. 80, epsilon_s = 1e-3) whatever the model
_EDM_SIGMA_MIN, _EDM_SIGMA_MAX, _EPS_S = 0.002, 80.0, 1e-3


def _vp_fit() -> tuple[float, float]:
    """(beta_min, beta_d) of the VP schedule alpha(tau) = exp(-beta_d tau^2 / 2 - beta_min tau) with
    sigma(1) = 80 and sigma(1e-3) = 0.002."""
    beta_d = 2 * (math.log(_EDM_SIGMA_MIN**2 + 1) / _EPS_S - math.log(_EDM_SIGMA_MAX**2 + 1)) / (_EPS_S - 1)
    return math.log(_EDM_SIGMA_MAX**2 + 1) - 0.5 * beta_d, beta_d


def deis_coefficients(sigmas, max_order: int = 3, points: int = 10_000) -> list[list[float]]:
    """DEIS tAB weights per step: weight j of step i is the integral over [tau_i, tau_i+1] of the Lagrange
    basis polynomial of node tau_(i-j) (nodes tau_i .. tau_(i-order+1)) times dsigma/dtau, by ComfyUI's
    Riemann sum over ``points`` evenly spaced taus. dsigma/dtau = -(1/2) (dlog alpha/dtau) /
    sqrt(alpha (1 - alpha)). The step into sigma 0 is an Euler step (no weights)."""
    beta_min, beta_d = _vp_fit()
    s = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    taus = (np.sqrt(beta_min**2 + 2 * beta_d * np.log(s**2 + 1)) - beta_min) / beta_d
    out: list[list[float]] = []
    for i in range(len(s) - 1):
        order = min(i + 1, max_order)
        if order == 1 or s[i + 1] <= 0:  # the step into sigma 0 is an Euler step
            out.append([])
            continue
        grid = np.linspace(taus[i], taus[i + 1], points)
        dtau = (taus[i + 1] - taus[i]) / points
        alpha = np.exp(-0.5 * grid**2 * beta_d - grid * beta_min)
        integrand = 0.5 * (grid * beta_d + beta_min) / np.sqrt(alpha * (1 - alpha))
        nodes = taus[[i - k for k in range(order)]]
        weights = []
        for j in range(order):
            poly = np.ones_like(grid)
            for k in range(order):
                if k != j:
                    poly *= (grid - nodes[k]) / (nodes[j] - nodes[k])
            weights.append(float(np.sum(integrand * poly) * dtau))
        out.append(weights)
    return out


@torch.no_grad()
def sample_deis(denoise, x, sigmas, *, noise=None, callback=None, generator=None, max_order=3, **_):
    """DEIS tAB of order up to ``max_order`` (ComfyUI's ``deis``, its default 'tab' mode)."""
    coefficients = deis_coefficients(sigmas, max_order)
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigma, denoised)
        ds = [*ds, d][-max_order:]
        weights = coefficients[i]
        if sigma_next <= 0 or not weights:
            x = x + (sigma_next - sigma) * d
        else:
            x = x + sum(w * dk for w, dk in zip(weights, reversed(ds)))
    return x


def _phi1(t: float) -> float:
    return math.expm1(t) / t


def _phi2(t: float) -> float:
    return (_phi1(t) - 1.0) / t


@torch.no_grad()
def sample_res_multistep(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=0.0, s_noise=1.0, cfg_pp=False, **_
):
    """RES second-order multistep (ComfyUI's ``res_multistep``; ``eta`` > 0 is its ancestral variant):
    with lambda = -log sigma and h = lambda(sigma_down) - lambda(sigma),
    x_next = e^-h x + h (b1 D + b2 D_prev), c2 = (lambda(sigma_prev) - lambda(sigma_down_prev)) / h,
    b1 = phi1(-h) - phi2(-h) / c2, b2 = phi2(-h) / c2; Euler (in sigma) on the first step and into 0.
    ``cfg_pp`` (ComfyUI's ``res_multistep_cfg_pp``): CFG++ (sampling.cfgpp), the step starts from
    x + D - D_u and integrates the unconditional estimates D_u."""
    draw = noise_or_default(noise, x, generator)
    old_denoised = old_down = None
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        uncond = last_unconditional(denoise) if cfg_pp else denoised
        _report(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        if down == 0 or old_denoised is None:
            x = denoised + (x - uncond) / sigma * down
        else:
            h = math.log(sigma) - math.log(down)
            c2 = (math.log(old_down) - math.log(float(sigmas[i - 1]))) / h
            b2 = _phi2(-h) / c2
            b1 = _phi1(-h) - b2
            x = math.exp(-h) * (x + denoised - uncond) + h * (b1 * uncond + b2 * old_denoised)
        if float(sigmas[i + 1]) > 0 and up > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * up
        old_denoised, old_down = uncond, down
    return x


def er_sde_noise_scale(sigma):
    """ComfyUI's default ER-SDE noise scale function (VE): sigma (e^(sigma^0.3) + 10)."""
    if torch.is_tensor(sigma):
        return sigma * (sigma**0.3).exp() + 10.0 * sigma
    return sigma * (math.exp(sigma**0.3) + 10.0)


@torch.no_grad()
def sample_er_sde(denoise, x, sigmas, *, noise=None, callback=None, generator=None, s_noise=1.0, max_stage=3, **_):
    """ER-SDE-Solver-3 (VE): x_next = r x + (1 - r) D, r = f(sigma_next) / f(sigma), then the second and third
    stages from divided differences of D, their integrals by ComfyUI's 200-point Riemann sums, and
    noise of variance sigma_next^2 - r^2 sigma^2."""
    draw = noise_or_default(noise, x, generator)
    points = torch.arange(0, 200, dtype=torch.float64)
    old_denoised = old_dd = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        r = er_sde_noise_scale(sigma_next) / er_sde_noise_scale(sigma)
        if sigma_next == 0:
            x = denoised
        else:
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = sigma_next - sigma
                step = -dt / 200
                positions = sigma_next + points * step
                scaled = er_sde_noise_scale(positions)
                f_next = er_sde_noise_scale(sigma_next)
                dd = (denoised - old_denoised) / (sigma - float(sigmas[i - 1]))
                x = x + (dt + float((1 / scaled).sum()) * step * f_next) * dd
                if stage >= 3:
                    s_u = float(((positions - sigma) / scaled).sum()) * step
                    du = (dd - old_dd) / ((sigma - float(sigmas[i - 2])) / 2)
                    x = x + (dt**2 / 2 + s_u * f_next) * du
                old_dd = dd
        if s_noise and sigma_next > 0:  # drawn even when the variance rounds below 0, as ComfyUI
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * math.sqrt(max(sigma_next**2 - sigma**2 * r**2, 0.0))
        old_denoised = denoised
    return x
