"""DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023) in the sigma form of the samplers.

Time variable lambda = -log(sigma) (log signal-to-noise ratio), h = lambda_next - lambda; data
prediction ("++") form throughout. Same signature as ``sampling.samplers``.
"""

from __future__ import annotations

import math

import torch

from latentforge.sampling.samplers import _report, ancestral_step, noise_or_default, to_d


def _lam(sigma) -> float:
    return -math.log(float(sigma))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, **_
):
    """DPM-Solver++(2S), single-step second order, with ancestral noise."""
    draw = noise_or_default(noise, x, generator)
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sigma, denoised) * (down - sigma)
        else:
            h = _lam(down) - _lam(sigma)
            s_mid = math.exp(-(_lam(sigma) + h / 2))
            x2 = (s_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised2 = denoise(x2, s_mid)
            x = (down / sigma) * x - math.expm1(-h) * denoised2
        if float(sigmas[i + 1]) > 0 and up > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, r=0.5, **_
):
    """DPM-Solver++ SDE: a two-stage stochastic step (intermediate point at r of the step in lambda)."""
    draw = noise_or_default(noise, x, generator)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = _lam(sigma), _lam(sigma_next)
        h = lam_next - lam
        s_mid = math.exp(-(lam + h * r))
        down, up = ancestral_step(sigma, s_mid, eta)
        x2 = (down / sigma) * x - math.expm1(lam - _lam(down)) * denoised
        x2 = x2 + draw(sigma, s_mid) * s_noise * up
        denoised2 = denoise(x2, s_mid)
        down, up = ancestral_step(sigma, sigma_next, eta)
        mixed = (1 - fac) * denoised + fac * denoised2
        x = (down / sigma) * x - math.expm1(lam - _lam(down)) * mixed
        x = x + draw(sigma, sigma_next) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, *, noise=None, callback=None, generator=None, **_):
    """DPM-Solver++(2M): second-order multistep; first order on the first step and into sigma 0."""
    old = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lam(sigma_next) - _lam(sigma)
        d = denoised
        if old is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, solver_type="midpoint", **_
):
    """DPM-Solver++(2M) SDE (midpoint or heun correction of the second-order term)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    draw = noise_or_default(noise, x, generator)
    old = h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lam(sigma_next) - _lam(sigma)
        eta_h = eta * h
        decay = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + decay * denoised
        if old is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
            else:
                x = x + 0.5 * decay * (1 / r) * (denoised - old)
        if eta:
            x = x + draw(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=1.0, s_noise=1.0, **_):
    """DPM-Solver++(3M) SDE: third-order multistep with exponential-integrator phi functions."""
    draw = noise_or_default(noise, x, generator)
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = _lam(sigma_next) - _lam(sigma)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + draw(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            h_1, h_2 = h, h_1
        d_1, d_2 = denoised, d_1
    return x


def _unipc_coefficients(
    rks: list[float], h: float, order: int, variant: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The linear system of UniPC's B(h) update (Zhao et al. 2023, Algorithm 1): R (order x order),
    b (order), and B(h) (bh1: h, bh2: e^h - 1), with hh = -h in the data-prediction form."""
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, b = [], []
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(b, dtype=torch.float64), b_h


@torch.no_grad()
def sample_unipc(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    order=2,
    variant="bh2",
    lower_order_final=True,
    **_,
):
    """UniPC (Zhao et al. 2023): multistep predictor UniP-p and corrector UniC, data prediction.

    The corrector refines each new point with the model output evaluated there (no extra evaluation);
    ``order`` 1-3, ``variant`` 'bh1' or 'bh2'; ``lower_order_final`` drops the order near the end.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError("UniPC variant must be 'bh1' or 'bh2'")
    n = len(sigmas) - 1
    lam = [_lam(s) if float(s) > 0 else math.inf for s in sigmas]
    outputs: list[torch.Tensor] = []  # denoised at previous points, newest last
    last_x = None
    this_order = 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, x, sigmas[i], denoised)
        if last_x is not None:  # UniC: correct x_i using the output just computed there
            h = lam[i] - lam[i - 1]
            m0 = outputs[-1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, this_order)]
            d1s = [(outputs[-1 - k] - m0) / rk for k, rk in enumerate(rks, start=1)]
            R, b, b_h = _unipc_coefficients(rks, h, this_order, variant)
            rhos = [0.5] if this_order == 1 else torch.linalg.solve(R, b).tolist()
            corr = sum(rho * d for rho, d in zip(rhos[:-1], d1s))
            x = (float(sigmas[i]) / float(sigmas[i - 1])) * last_x - math.expm1(-h) * m0
            x = x - b_h * (corr + rhos[-1] * (denoised - m0))
        outputs = [*outputs[-(order - 1) :], denoised] if order > 1 else [denoised]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(outputs), i + 1)
        last_x = x
        if sigma_next == 0:
            x = denoised
            continue
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, this_order)]
        d1s = [(outputs[-1 - k] - denoised) / rk for k, rk in enumerate(rks, start=1)]
        x_new = (sigma_next / sigma) * x - math.expm1(-h) * denoised
        if d1s:
            R, b, b_h = _unipc_coefficients(rks, h, this_order, variant)
            rhos = [0.5] if this_order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_new = x_new - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
        x = x_new
    return x
