"""Every sampler on data whose exact denoiser is known: x0 ~ N(mu, s^2) elementwise, so
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE from sigma_T has the
closed form x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)) (x_T - mu)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentforge.sampling import SAMPLERS, NoiseSchedule, get_sigmas

MU, S = 0.5, 0.6


def exact_denoiser(x, sigma):
    sigma = float(sigma)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_flow(x_t, sigma_t, sigma):
    return MU + math.sqrt((S**2 + sigma**2) / (S**2 + sigma_t**2)) * (x_t - MU)


class Unguided:
    """A denoiser seen as a guided one without guidance: CFG++ samplers read its unconditional
    estimate, which is then the estimate itself (CFG++ at scale 1 is its plain sampler)."""

    def __init__(self, fn):
        self.fn, self.last_uncond = fn, None

    def __call__(self, x, sigma):
        self.last_uncond = self.fn(x, sigma)
        return self.last_uncond


def exact_consistency(x, sigma):
    """The consistency function (Song et al. 2023): x at sigma carried along the ODE to sigma 0."""
    return exact_flow(x, float(sigma), 0.0)


@pytest.mark.parametrize("info", SAMPLERS, ids=lambda i: i.name)
def test_sampled_distribution_matches_the_data(info):
    schedule = NoiseSchedule()
    # fine enough that discretization error is small; RES's ancestral variant measures its second-order
    # term over the previous step's deterministic part only (as ComfyUI), and needs finer steps
    steps = 1000 if info.name.startswith("res_multistep_ancestral") else 250
    sigmas = get_sigmas(info.schedule, schedule, steps)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    # LCM is made for consistency models, whose output is a sample, not the posterior mean
    model = exact_consistency if info.name == "lcm" else exact_denoiser
    out = info.fn(Unguided(model), x, sigmas, generator=torch.Generator().manual_seed(1))
    mean, std = float(out.mean()), float(out.std())
    assert abs(mean - MU) < 0.015, f"{info.name}: mean {mean:.4f} vs {MU}"
    assert abs(std - S) / S < 0.03, f"{info.name}: std {std:.4f} vs {S}"


# Expected convergence order on the ODE (stochastic samplers with their noise switched off). A multistep
# method that starts (or, with lower_order_final, ends) with a first-order step keeps that step's
# O(h^2) local error, so 3M SDE and UniPC show global order 2 here; PLMS's fixed Adams-Bashforth
# weights assume equal steps, and this grid is geometric in sigma.
ORDERS = {
    "euler": 1,
    "heun": 2,
    "dpm_2": 2,
    "lms": 3,
    "dpmpp_2m": 2,
    "plms": 2,
    "uni_pc": 2,
    "ddim": 1,
    "dpmpp_2s_ancestral": 2,
    "dpmpp_sde": 2,
    "dpmpp_2m_sde": 2,
    "dpmpp_3m_sde": 2,
    "dpmpp_2m_sde_heun": 2,
    "uni_pc_bh2": 2,
    # CFG++ without guidance is its plain sampler
    "euler_cfg_pp": 1,
    "ddim_cfg_pp": 1,
    "dpmpp_2m_cfg_pp": 2,
    # Heun++ 2 weighs its slopes by sigma / sigma_0, not 1/2: consistent, first order
    "heunpp2": 1,
    "ipndm": 2,  # fixed equal-step weights, as PLMS
    "deis": 3,  # its weights are integrated over the actual steps
    "res_multistep": 2,
    "res_multistep_cfg_pp": 2,
}
# Not here: DPM fast (its last one or two steps are of order 2/1, whose share changes with the step count),
# DPM adaptive (picks its own steps), Restart and ER-SDE (they add noise by design); k-diffusion parity
# and the distribution test above check them.


def _error(info, steps: int) -> float:
    sigma_t, sigma_end = 10.0, 0.1
    sigmas = torch.exp(torch.linspace(math.log(sigma_t), math.log(sigma_end), steps + 1, dtype=torch.float64))
    x_t = MU + math.sqrt(S**2 + sigma_t**2) * torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(64, 1, 1, 1)
    out = info.fn(Unguided(exact_denoiser), x_t.clone(), sigmas, eta=0.0)
    return float((out - exact_flow(x_t, sigma_t, sigma_end)).abs().max())


@pytest.mark.parametrize("name", list(ORDERS))
def test_deterministic_samplers_converge_at_their_order(name):
    info = next(i for i in SAMPLERS if i.name == name)
    errors = [_error(info, n) for n in (32, 64, 128, 256)]
    observed = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert errors[-1] < errors[0]
    assert observed[-1] > ORDERS[name] - 0.35, f"{name}: errors {errors}, observed orders {observed}"
