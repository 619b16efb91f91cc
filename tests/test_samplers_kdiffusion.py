"""The samplers k-diffusion has (DPM fast, DPM adaptive, DPM++ 2M SDE Heun, ...) against k-diffusion's own
code on a small nonlinear denoiser with the same noise; Restart (A1111) and the CFG++ samplers against
their papers' procedures written out here; DEIS's weights against direct integration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from kdiffusion_ref import load
from latentforge.sampling import (
    CFGDenoiser,
    Cond,
    ModelDenoiser,
    NoiseSchedule,
    cfgpp,
    get_sigmas,
    multistep,
    resolve_sampler,
)
from latentforge.sampling import samplers as sm
from scheduler_harness import model_fn

SHAPE = (2, 4, 6, 6)


def _denoiser(prediction="eps"):
    class Net:
        def __call__(self, x, t, context, y=None):
            return model_fn(x, t) + 0.3 * context[:, :1, :1, None]

    model = ModelDenoiser(Net(), NoiseSchedule(), prediction)
    cond = Cond(torch.ones(SHAPE[0], 1, 1))

    def denoise(x, sigma):
        return model(x, sigma, cond).to(x.dtype)

    return denoise


def _noise_list(count=400, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float32) for _ in range(count)]


def _sampler(noises):
    it = iter(noises)
    return lambda sigma=None, sigma_next=None: next(it)


def _start(sigmas):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name,steps", [("DPM fast", 10), ("DPM fast", 12), ("DPM adaptive", 10)])
def test_dpm_fast_and_adaptive_match_k_diffusion(name, steps, eta, prediction):
    k = load()
    info, _ = resolve_sampler(name)
    denoise = _denoiser(prediction)
    sigmas = get_sigmas(info.schedule, NoiseSchedule(), steps)
    x = _start(sigmas)
    noises = _noise_list()
    # A1111 passes the smallest positive sigma and the largest, and the step count
    ends = dict(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), noise_sampler=_sampler(noises), disable=True)
    if name == "DPM fast":
        expected = k.sample_dpm_fast(denoise, x.clone(), n=steps, eta=eta, **ends)
    else:
        expected = k.sample_dpm_adaptive(denoise, x.clone(), eta=eta, **ends)
    ours = info.fn(denoise, x.clone(), sigmas, noise=_sampler(noises), eta=eta)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_a1111_runs_dpm_fast_with_ancestral_eta():
    """A1111 passes its "eta for ancestral samplers" (default 1) to every k-diffusion sampler taking eta."""
    k = load()
    info, _ = resolve_sampler("DPM fast")
    denoise = _denoiser()
    sigmas = get_sigmas("normal", NoiseSchedule(), 9)
    x = _start(sigmas)
    noises = _noise_list()
    expected = k.sample_dpm_fast(
        denoise, x.clone(), float(sigmas[-2]), float(sigmas[0]), 9, eta=1.0, noise_sampler=_sampler(noises)
    )
    ours = info.fn(denoise, x.clone(), sigmas, noise=_sampler(noises))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name,kfn,options", [("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"})])
def test_sigma_samplers_match_k_diffusion(name, kfn, options):
    k = load()
    info, _ = resolve_sampler(name)
    denoise = _denoiser()
    sigmas = get_sigmas(info.schedule, NoiseSchedule(), 8)
    x = _start(sigmas)
    noises = _noise_list()
    expected = getattr(k, kfn)(denoise, x.clone(), sigmas, noise_sampler=_sampler(noises), disable=True, **options)
    ours = info.fn(denoise, x.clone(), sigmas, noise=_sampler(noises))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class _TorchWithNoise:
    """A1111's ``TorchHijack``: k-diffusion's module-level ``torch`` whose ``randn_like`` takes the next
    draw of the image's noise, everything else the real torch."""

    def __init__(self, noises):
        self.draws = iter(noises)

    def randn_like(self, x):
        return next(self.draws)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize(
    ("name", "kfn"), [("Euler", "sample_euler"), ("Heun", "sample_heun"), ("DPM2", "sample_dpm_2")]
)
@pytest.mark.parametrize("tmax", [math.inf, 2.0])
def test_churn_matches_k_diffusion_as_a1111_runs_it(name, kfn, tmax, monkeypatch):
    """A1111's Euler, Heun and DPM2 take Sigma churn/tmin/tmax/noise; k-diffusion draws noise in every
    step (also where s_tmax leaves a step without churn), so the later steps' noise matches only if those
    draws are made too."""
    k = load()
    info, _ = resolve_sampler(name)
    denoise = _denoiser()
    sigmas = get_sigmas(info.schedule, NoiseSchedule(), 8).float()  # as A1111 gives them to k-diffusion
    x = _start(sigmas)
    noises = _noise_list()
    churn = dict(s_churn=1.5, s_tmin=0.05, s_tmax=tmax, s_noise=0.95)
    monkeypatch.setattr(k, "torch", _TorchWithNoise(noises))
    expected = getattr(k, kfn)(denoise, x.clone(), sigmas, disable=True, **churn)
    monkeypatch.undo()
    ours = info.fn(denoise, x.clone(), sigmas, noise=_sampler(noises), **churn)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    plain = info.fn(denoise, x.clone(), sigmas, noise=_sampler(noises))
    assert (plain - ours).abs().max() > 1e-2 * float(expected.abs().max())  # the churn did something


# --- Restart (Xu et al. 2023) as A1111 configures it, written from the paper: run the ODE (Heun) down the
# main schedule; on reaching t_min = the level nearest 0.1, K times: add noise to go back up to t_max = the
# level nearest 2 (x += sqrt(t_max^2 - t_min^2) * eps) and run the ODE down to t_min again over N_restart
# Karras levels. A1111: from 20 steps K = 1 and N_restart = 10 levels; the main schedule is Karras over
# the remaining steps, so the total number of Heun steps equals the requested steps.


def _karras(n, lo, hi, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return list((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def _heun(denoise, x, s, s_next):
    d = (x - denoise(x, s)) / s
    if s_next == 0:
        return x + d * (s_next - s)
    x2 = x + d * (s_next - s)
    d2 = (x2 - denoise(x2, s_next)) / s_next
    return x + (d + d2) / 2 * (s_next - s)


def test_restart_follows_the_paper():
    denoise = _denoiser()
    given = get_sigmas("karras", NoiseSchedule(), 24)
    main = [*_karras(24 - 9, float(given[-2]), float(given[0])), 0.0]
    i_min = int(np.argmin([abs(s - 0.1) for s in main]))
    i_max = int(np.argmin([abs(s - 2.0) for s in main]))
    restart = _karras(10, main[i_min], main[i_max])
    x0 = _start(given)
    noises = _noise_list()
    x = x0.clone()
    for i in range(len(main) - 1):
        x = _heun(denoise, x, main[i], main[i + 1])
        if i + 1 == i_min:
            x = x + math.sqrt(restart[0] ** 2 - restart[-1] ** 2) * noises[0]
            for a, b in itertools.pairwise(restart):
                x = _heun(denoise, x, a, b)
    ours = sm.sample_restart(denoise, x0.clone(), given, noise=_sampler(noises))
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [5, 19, 20, 21, 35, 36, 50])
def test_restart_spends_the_requested_steps(steps):
    sigmas = get_sigmas("karras", NoiseSchedule(), steps)
    assert len(sm.restart_steps(sigmas)) == steps


# --- CFG++ (Chung et al. 2024, Algorithm 1, DDIM form): with eps_lambda = eps_u + lambda (eps_c - eps_u),
# x0 = (x_t - sqrt(1 - a_t) eps_lambda) / sqrt(a_t), x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_u;
# A1111's DDIM CFG++ uses lambda = CFG scale / 12.5, ComfyUI's euler_cfg_pp lambda = CFG scale.


def _guided_pair():
    class Net:
        def __call__(self, x, t, context, y=None):
            return model_fn(x, t) + 0.3 * context[:, :1, :1, None]

    schedule = NoiseSchedule()
    model = ModelDenoiser(Net(), schedule, "eps")
    cond, uncond = Cond(torch.ones(SHAPE[0], 1, 1)), Cond(-torch.ones(SHAPE[0], 1, 1))
    return schedule, model, Net(), cond, uncond


@pytest.mark.parametrize("name,scale,lam", [("DDIM CFG++", 7.5, 7.5 / 12.5), ("euler_cfg_pp", 1.6, 1.6)])
def test_cfg_pp_is_the_papers_ddim_step(name, scale, lam):
    info, _ = resolve_sampler(name)
    schedule, model, net, cond, uncond = _guided_pair()
    sigmas = get_sigmas("ddim_uniform", schedule, 10)
    ts = [int((schedule.sigmas - s).abs().argmin()) for s in sigmas[:-1].tolist()]
    abar = schedule.alphas_cumprod
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    # ours works on x / sqrt(abar) (sigma form); the VP start is x_T = noise
    ours = info.fn(CFGDenoiser(model, cond, uncond, scale), x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    x = x_vp.clone()
    ctx = torch.ones(SHAPE[0], 1, 1)
    for k, t in enumerate(ts):
        a_t = float(abar[t])
        a_prev = float(abar[ts[k + 1]]) if k + 1 < len(ts) else 1.0
        tt = torch.full((SHAPE[0],), float(t))
        eps_c, eps_u = net(x, tt, ctx), net(x, tt, -ctx)
        eps = eps_u + lam * (eps_c - eps_u)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps_u
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_cfg_pp_without_guidance_is_the_plain_sampler():
    _, model, _, cond, _ = _guided_pair()
    sigmas = get_sigmas("karras", NoiseSchedule(), 8)
    x = _start(sigmas).float()
    pairs = (("dpmpp_2m_cfg_pp", "dpmpp_2m"), ("euler_cfg_pp", "euler"), ("res_multistep_cfg_pp", "res_multistep"))
    for pp, plain in pairs:
        a = resolve_sampler(pp)[0].fn(CFGDenoiser(model, cond, None, 1.0), x.clone(), sigmas)
        b = resolve_sampler(plain)[0].fn(CFGDenoiser(model, cond, None, 1.0), x.clone(), sigmas)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cfg_pp_needs_the_unconditional_estimate():
    with pytest.raises(TypeError, match="last_uncond"):
        cfgpp.sample_euler_cfg_pp(lambda x, s: x * 0, torch.ones(1, 1, 1, 1), torch.tensor([1.0, 0.0]))


def test_deis_weights_are_the_integrals_of_the_lagrange_basis():
    """DEIS tAB: weight j = integral of l_j(tau(sigma)) dsigma over the step, tau the VP time fitted to
    sigma 0.002..80; quad instead of ComfyUI's Riemann sum, whose relative error is ~1/N."""
    beta_d = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
    beta_min = math.log(80.0**2 + 1) - 0.5 * beta_d

    def tau(s):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(s**2 + 1)) - beta_min) / beta_d

    sigmas = get_sigmas("karras", NoiseSchedule(), 6)
    s = sigmas.tolist()
    weights = multistep.deis_coefficients(sigmas, 3)
    assert weights[0] == [] and weights[-1] == []
    for i in range(1, len(s) - 2):
        nodes = [tau(s[i - k]) for k in range(min(i + 1, 3))]
        for j, w in enumerate(weights[i]):

            def basis(sig, j=j, nodes=nodes):
                t = tau(sig)
                return math.prod((t - nodes[k]) / (nodes[j] - nodes[k]) for k in range(len(nodes)) if k != j)

            exact = integrate.quad(basis, s[i], s[i + 1], epsabs=0, epsrel=1e-10)[0]
            assert w == pytest.approx(exact, rel=2e-3, abs=1e-6 * abs(s[i + 1] - s[i]))
        assert sum(weights[i]) == pytest.approx(s[i + 1] - s[i], rel=1e-3)


def test_a1111_second_order_flags_and_default_schedules():
    """A1111's sd_samplers_kdiffusion marks these "second_order" (prompt schedules over 2 x steps; Forge not
    HeunPP2) and gives them their "Automatic" schedule."""
    schedules = {
        "DPM2": "karras",
        "DPM2 a": "karras",
        "DPM++ 2M SDE Heun": "exponential",
        "Restart": "karras",
        "DPM fast": "normal",
        "DPM adaptive": "normal",
        "DDIM CFG++": "ddim_uniform",
    }
    for title, schedule in schedules.items():
        assert resolve_sampler(title)[0].schedule == schedule, title
    a1111 = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
    others = ["Euler", "DPM fast", "DPM adaptive", "DPM++ 2M SDE Heun", "DDIM CFG++", "UniPC", "HeunPP2"]
    for title in [*a1111, *others]:
        assert resolve_sampler(title)[0].second_order == (title in a1111), title


def test_linear_quadratic_schedule_by_hand():
    """ComfyUI's linear_quadratic for 4 steps (threshold 0.025, 2 linear steps), worked out by hand: linear
    part 0, 0.0125; quadratic a i^2 + b i + c with a = 1.9 / 8, b = 0.0125 - 0.95, c = 4a, at i = 2, 3:
    0.025, 0.275; then 1. Sigmas are (1 - those) * sigma_max."""
    schedule = NoiseSchedule()
    expected = torch.tensor([1.0, 0.9875, 0.975, 0.725, 0.0], dtype=torch.float64) * schedule.sigma_max
    torch.testing.assert_close(get_sigmas("linear_quadratic", schedule, 4), expected)
    one = get_sigmas("linear quadratic", schedule, 1)
    torch.testing.assert_close(one, torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64))


def test_cli_lists_every_sampler(capsys):
    from latentforge.cli import main
    from latentforge.sampling import SAMPLERS

    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0] for line in out.splitlines()}
    for info in SAMPLERS:
        assert info.title in lines and info.name in out, info.title
    assert "dpmpp_2m_sde_heun_gpu" in out and "linear_quadratic" in out


def test_guided_denoiser_exposes_the_unconditional_estimate_through_wrappers():
    from latentforge.sampling.denoisers import WrappedDenoiser, last_unconditional

    _, model, _, cond, uncond = _guided_pair()
    guided = CFGDenoiser(model, cond, uncond, 5.0)
    wrapped = WrappedDenoiser(lambda x, s: guided(x, s) * 0 + 1, guided)  # a wrapper that replaces the output
    x = _start(torch.tensor([3.0]))
    wrapped(x, 3.0)
    torch.testing.assert_close(last_unconditional(wrapped), model(x, 3.0, uncond))
    alone = CFGDenoiser(model, cond, None, 5.0)
    alone(x, 3.0)
    torch.testing.assert_close(last_unconditional(alone), model(x, 3.0, cond))


def test_cfg_pp_runs_under_the_inpainting_wrapper():
    """Inpainting wraps the guided denoiser (masked blend); CFG++ still finds the unconditional estimate."""
    import latentforge
    from latentforge.demo import bundled_model_path
    from test_inpaint import _box_mask, _photo

    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    pipe = latentforge.load(path, dtype="fp32")
    init, mask = _photo(), _box_mask()
    for sampler in ("Euler CFG++", "DDIM CFG++", "dpmpp_2m_cfg_pp"):
        result = pipe.img2img(
            init, "a green square", mask=mask, mask_blur=0, denoising_strength=0.8, steps=4, seed=3, sampler=sampler
        )
        out, src, m = np.asarray(result.images[0]), np.asarray(init), np.asarray(mask) > 0
        assert np.array_equal(out[~m], src[~m]), sampler
        assert f"Sampler: {resolve_sampler(sampler)[0].title}" in result.infotexts[0]
