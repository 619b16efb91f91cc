"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in its noise-prediction form: A1111's "DPM fast" (fixed
steps of order 3, 2, 1, Lu et al. Algorithm "DPM-Solver-fast") and "DPM adaptive" (DPM-Solver-12/23 with
a PID step-size controller, Lu et al. Section 4.2 and Algorithm 4).

Time is lambda = -log(sigma); eps = (x - D(x)) / sigma. These samplers only use the ends of the sigma
schedule they are given (the largest sigma and the smallest positive one) and its step count, as A1111
passes them; they stop at that smallest sigma (no final step to sigma 0), as k-diffusion does. Same
signature as ``sampling.samplers``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentforge.sampling.samplers import _report, ancestral_step, noise_or_default


def _ends(sigmas) -> tuple[float, float]:
    positive = [float(s) for s in sigmas if float(s) > 0]
    if not positive:
        raise ValueError("DPM fast/adaptive need a sigma schedule with at least one sigma above 0")
    return positive[0], min(positive)


class _Solver:
    """The DPM-Solver-1/2/3 single steps of Lu et al. (eqs. 3.7-3.9, noise prediction), sharing the
    model evaluation at the start of a step."""

    def __init__(self, denoise):
        self.denoise = denoise
        self.calls = 0

    def eps(self, x: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        sigma = math.exp(-lam)
        denoised = self.denoise(x, sigma)
        self.calls += 1
        return (x - denoised) / sigma, denoised

    def _first_stage(self, x, lam, h, eps, r1, cache):
        """eps at the intermediate point lam + r1 h; the same point of one step is evaluated once."""
        if r1 not in cache:
            s1 = lam + r1 * h
            cache[r1] = self.eps(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)[0]
        return cache[r1]

    def step(
        self, x: Tensor, lam: float, lam_next: float, eps: Tensor, order: int, r1: float = 1 / 3, cache=None
    ) -> Tensor:
        """Order 1 (DDIM), 2 (intermediate point at r1 of the step) or 3 (points at r1 = 1/3, r2 = 2/3).
        ``cache`` (a dict per step) shares the first intermediate evaluation between the two solutions
        of an adaptive step."""
        cache = {} if cache is None else cache
        h = lam_next - lam
        s_next = math.exp(-lam_next)
        if order == 1:
            return x - s_next * math.expm1(h) * eps
        if order == 2:
            eps1 = self._first_stage(x, lam, h, eps, r1, cache)
            return x - s_next * math.expm1(h) * eps - s_next / (2 * r1) * math.expm1(h) * (eps1 - eps)
        r1, r2 = 1 / 3, 2 / 3
        s2 = lam + r2 * h
        eps1 = self._first_stage(x, lam, h, eps, r1, cache)
        phi = math.expm1(r2 * h) / (r2 * h) - 1
        u2 = x - math.exp(-s2) * math.expm1(r2 * h) * eps - math.exp(-s2) * (r2 / r1) * phi * (eps1 - eps)
        eps2, _ = self.eps(u2, s2)
        return x - s_next * math.expm1(h) * eps - s_next / r2 * (math.expm1(h) / h - 1) * (eps2 - eps)


def _ancestral_target(lam: float, lam_next: float, lam_end: float, eta: float) -> tuple[float, float]:
    """(lambda to step to, sigma of the noise added after) for eta > 0: the ancestral split of the step
    in sigma, never past the end of the schedule."""
    if not eta:
        return lam_next, 0.0
    down, _ = ancestral_step(math.exp(-lam), math.exp(-lam_next), eta)
    target = min(lam_end, -math.log(down)) if down > 0 else lam_end
    up = math.sqrt(max(math.exp(-2 * lam_next) - math.exp(-2 * target), 0.0))
    return target, up


@torch.no_grad()
def sample_dpm_fast(denoise, x, sigmas, *, noise=None, callback=None, generator=None, eta=0.0, s_noise=1.0, **_):
    """DPM-Solver-fast: ``len(sigmas) - 1`` model calls spent on steps evenly spaced in lambda between
    the schedule's ends, of order 3 except the last one or two (Lu et al., Section 3.4)."""
    nfe = len(sigmas) - 1
    sigma_max, sigma_min = _ends(sigmas)
    draw = noise_or_default(noise, x, generator)
    lam_start, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    lams = torch.linspace(lam_start, lam_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    solver = _Solver(denoise)
    for i, order in enumerate(orders):
        lam, lam_next = lams[i], lams[i + 1]
        target, up = _ancestral_target(lam, lam_next, lam_end, eta)
        eps, denoised = solver.eps(x, lam)
        _report(callback, i, x, torch.tensor(math.exp(-lam)), denoised)
        x = solver.step(x, lam, target, eps, order, r1=0.5 if order == 2 else 1 / 3)
        if up:
            x = x + draw(math.exp(-lam), math.exp(-lam_next)) * s_noise * up
    return x


class PIDController:
    """Step-size control from the error of an embedded lower-order solution (Söderlind's PID form, as
    Lu et al. use it): h *= limiter(prod e_k^b_k) with e = 1 / error; accepted when the factor reaches
    ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b[0] * self.errs[1] ** self.b[1] * self.errs[2] ** self.b[2]
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    denoise,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    generator=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    **_,
):
    """DPM-Solver-12 (order 2) or -23 (order 3) with adaptive steps between the schedule's ends: each
    step compares the order-(k-1) and order-k solutions and the controller picks the next step size;
    the step count is not fixed (the schedule's length is not used)."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive: order must be 2 or 3, got {order!r}")
    sigma_max, sigma_min = _ends(sigmas)
    draw = noise_or_default(noise, x, generator)
    lam, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    pid = PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    solver = _Solver(denoise)
    x_prev = x
    step = 0
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + pid.h)
        target, up = _ancestral_target(lam, lam_next, lam_end, eta)
        eps, denoised = solver.eps(x, lam)
        _report(callback, step, x, torch.tensor(math.exp(-lam)), denoised)
        cache: dict = {}
        if order == 2:
            low = solver.step(x, lam, target, eps, 1)
            high = solver.step(x, lam, target, eps, 2, r1=0.5)
        else:
            low = solver.step(x, lam, target, eps, 2, r1=1 / 3, cache=cache)
            high = solver.step(x, lam, target, eps, 3, cache=cache)
        delta = torch.maximum(torch.full_like(low, atol), rtol * torch.maximum(low.abs(), x_prev.abs()))
        error = float(torch.linalg.vector_norm((low - high) / delta)) / low.numel() ** 0.5
        if pid.propose(error):
            x_prev = low
            x = high
            if up:
                x = x + draw(math.exp(-lam), math.exp(-lam_next)) * s_noise * up
            lam = lam_next
        step += 1
    return x
