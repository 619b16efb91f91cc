"""Samplers against the diffusers schedulers that implement the same method: same sigma/timestep
sequence, and the same result given the same model function and the same noise (eps and v).

diffusers settings are those of the SD pipelines (no x0 clipping, steps offset 1); the
timestep-indexed schedulers (DDIM, PLMS, DPM-Solver, UniPC, LCM, DDPM) run in their variance-
preserving scaling, which at sigma 0 equals ours. DPM-Solver and UniPC feed the model rounded
timesteps, so ours runs with ``quantize_timesteps`` there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers as D
import pytest
import torch

from latentforge.families import get_family
from latentforge.sampling import NoiseSchedule, get_sigmas
from latentforge.sampling import dpmsolver as dp
from latentforge.sampling import samplers as sm
from latentforge.sampling.noise import BrownianNoise
from scheduler_harness import diffusers_run, our_run

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LINSPACE = dict(BASE, timestep_spacing="linspace")
KARRAS = dict(BASE, use_karras_sigmas=True)
TIMESTEPS = dict(BASE, steps_offset=1, clip_sample=False, set_alpha_to_one=True)
PNDM = dict(BASE, steps_offset=1, set_alpha_to_one=True, skip_prk_steps=True)
DDPM = dict(BASE, steps_offset=1, clip_sample=False, timestep_spacing="leading")


@dataclass
class Case:
    name: str
    scheduler: type
    config: dict
    sampler: object
    schedule: str
    vp: bool = False  # timestep-indexed scheduler (unit-variance start)
    seed: int | None = None  # stochastic: same generator seed on both sides
    quantize: bool = False
    steps: int = 20
    options: dict = field(default_factory=dict)


CASES = [
    Case("euler", D.EulerDiscreteScheduler, LINSPACE, sm.sample_euler, "normal"),
    Case("euler karras", D.EulerDiscreteScheduler, KARRAS, sm.sample_euler, "karras"),
    Case("euler_ancestral", D.EulerAncestralDiscreteScheduler, LINSPACE, sm.sample_euler_ancestral, "normal", seed=5),
    Case("heun", D.HeunDiscreteScheduler, LINSPACE, sm.sample_heun, "normal"),
    Case("dpm_2", D.KDPM2DiscreteScheduler, LINSPACE, sm.sample_dpm_2, "normal"),
    Case("dpm_2_ancestral", D.KDPM2AncestralDiscreteScheduler, LINSPACE, sm.sample_dpm_2_ancestral, "normal", seed=5),
    Case("lms", D.LMSDiscreteScheduler, LINSPACE, sm.sample_lms, "normal"),
    Case(
        "dpmpp_2m karras",
        D.DPMSolverMultistepScheduler,
        dict(KARRAS, final_sigmas_type="zero"),
        dp.sample_dpmpp_2m,
        "karras",
        vp=True,
        quantize=True,
    ),
    Case(
        "dpmpp_2m_sde karras",
        D.DPMSolverMultistepScheduler,
        dict(KARRAS, algorithm_type="sde-dpmsolver++", final_sigmas_type="zero"),
        dp.sample_dpmpp_2m_sde,
        "karras",
        vp=True,
        seed=5,
        quantize=True,
    ),
    Case(
        "dpmpp_sde karras", D.DPMSolverSDEScheduler, dict(KARRAS, noise_sampler_seed=11), dp.sample_dpmpp_sde, "karras"
    ),
    Case("ddim", D.DDIMScheduler, TIMESTEPS, sm.sample_ddim, "ddim_uniform", vp=True),
    Case("plms", D.PNDMScheduler, PNDM, sm.sample_plms, "ddim_uniform", vp=True),
    Case(
        "uni_pc karras",
        D.UniPCMultistepScheduler,
        dict(KARRAS, final_sigmas_type="zero"),
        dp.sample_unipc,
        "karras",
        vp=True,
        quantize=True,
    ),
    Case("lcm", D.LCMScheduler, dict(TIMESTEPS, timestep_scaling=1e6), sm.sample_lcm, "lcm", vp=True, seed=5, steps=4),
    Case("ddpm", D.DDPMScheduler, DDPM, sm.sample_ddpm, "ddim_uniform", vp=True, seed=5),
]


def _diffusers_sigmas(sched) -> torch.Tensor:
    """The scheduler's sigma sequence, from its sigmas or (timestep-indexed ones) its timesteps."""
    if hasattr(sched, "sigmas") and sched.sigmas is not None and len(sched.sigmas) > 1:
        sigmas = torch.as_tensor(sched.sigmas, dtype=torch.float64)
        sigmas = torch.unique_consecutive(sigmas)  # Heun/DPM2 repeat each sigma for their 2nd stage
        return sigmas
    ac = sched.alphas_cumprod.to(torch.float64)[torch.as_tensor(sched.timesteps).long()]
    sigmas = torch.unique_consecutive(((1 - ac) / ac).sqrt())  # PLMS repeats its second timestep
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_diffusers(case: Case, prediction: str):
    if case.name == "plms" and prediction == "v":
        pytest.skip(
            "diffusers' PNDM averages raw v outputs of two points and converts them to eps at one of them; the "
            "original PLMS (CompVis, SD2) converts each output to eps at its own point first, as latentforge does"
        )
    dprediction = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    sched = case.scheduler(**case.config, prediction_type=dprediction)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = diffusers_run(sched, noise, case.steps, case.seed)

    ours_sigmas = get_sigmas(case.schedule, NoiseSchedule(), case.steps)
    theirs = _diffusers_sigmas(sched)
    if case.name.startswith(("heun", "dpm_2")):  # their 2nd-stage bookkeeping; the main sequence must agree
        theirs = torch.cat([theirs[theirs > 0][: case.steps], torch.zeros(1, dtype=torch.float64)])
    assert len(ours_sigmas) == len(theirs), (ours_sigmas, theirs)
    torch.testing.assert_close(ours_sigmas, theirs, rtol=2e-4, atol=1e-6)

    extra = {}
    if case.name.startswith("dpmpp_sde"):
        positive = ours_sigmas[ours_sigmas > 0]
        extra["noise_source"] = BrownianNoise([11], tuple(noise.shape[1:]), positive.min(), positive.max())
        # diffusers' tree is shaped like the whole batch; run one image so both draw the same numbers
        noise, expected = (
            noise[:1],
            diffusers_run(case.scheduler(**case.config, prediction_type=dprediction), noise[:1], case.steps, None),
        )
    start = None if case.vp else float(sched.init_noise_sigma)
    ours, _ = our_run(
        case.sampler,
        case.schedule,
        noise,
        case.steps,
        prediction,
        seed=case.seed,
        quantize=case.quantize,
        start_scale=start,
        **extra,
        **case.options,
    )
    scale = float(expected.abs().max())
    diff = float((ours - expected).abs().max())
    # Brownian increments are rough: diffusers computes the midpoint sigmas in float32 arithmetic, and a
    # last-bit difference in a query time moves the increment by ~sqrt(1e-7); its noise-free path is
    # checked to 2e-4 in test_dpmpp_sde_without_noise_matches_diffusers.
    tolerance = 5e-3 if case.name.startswith("dpmpp_sde") else 2e-4
    assert diff <= tolerance * scale, f"{case.name} ({prediction}): max diff {diff:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_sde_without_noise_matches_diffusers(prediction):
    sched = D.DPMSolverSDEScheduler(**KARRAS, noise_sampler_seed=11, prediction_type=prediction)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(20)
    x = noise * sched.init_noise_sigma
    from scheduler_harness import model_fn

    for t in sched.timesteps:
        x = sched.step(model_fn(sched.scale_model_input(x, t), t), t, x, s_noise=0.0).prev_sample
    ours, _ = our_run(
        dp.sample_dpmpp_sde,
        "karras",
        noise,
        20,
        "eps" if prediction == "epsilon" else "v",
        start_scale=float(sched.init_noise_sigma),
        s_noise=0.0,
    )
    assert float((ours - x).abs().max()) <= 2e-4 * float(x.abs().max())


def test_ddim_eta_matches_diffusers():
    """DDIM with eta = 1 draws its noise in the same order from the same generator."""
    sched = D.DDIMScheduler(**TIMESTEPS)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(20)
    x = noise * sched.init_noise_sigma
    g = torch.Generator().manual_seed(3)
    from scheduler_harness import model_fn

    for t in sched.timesteps:
        x = sched.step(model_fn(x, t), t, x, eta=1.0, generator=g).prev_sample
    ours, _ = our_run(sm.sample_ddim, "ddim_uniform", noise, 20, "eps", seed=3, eta=1.0)
    assert float((ours - x).abs().max()) <= 2e-4 * float(x.abs().max())


@pytest.mark.parametrize("family, table", [("sd1", "StableDiffusionSigmas"), ("sdxl-base", "StableDiffusionXLSigmas")])
def test_align_your_steps_levels_are_the_published_ones(family, table):
    from diffusers.schedulers import AysSchedules

    published = AysSchedules[table]  # NVIDIA's 10-step levels; diffusers puts 0 where the paper has 0.029
    # A1111: 11 steps = the 11 levels
    ours = get_sigmas("align_your_steps", NoiseSchedule.for_family(get_family(family)), 11)
    assert len(ours) == 12 and float(ours[-1]) == 0.0 and float(ours[-2]) == pytest.approx(0.029)
    torch.testing.assert_close(ours[:10], torch.tensor(published[:10], dtype=torch.float64))


@pytest.mark.parametrize("steps", [2, 7, 20, 30])
def test_align_your_steps_other_step_counts_interpolate_log_sigma(steps):
    """Other step counts: the levels, placed at evenly spaced positions, interpolated linearly in
    log-sigma (NVIDIA's how-to), here with numpy's interp on the ascending table as A1111 does."""
    import numpy as np
    from diffusers.schedulers import AysSchedules

    levels = np.array([*AysSchedules["StableDiffusionXLSigmas"][:10], 0.029])
    ascending = np.log(levels[::-1])
    expected = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(levels)), ascending))[::-1]
    ours = get_sigmas("Align Your Steps", NoiseSchedule.for_family(get_family("sdxl-refiner")), steps)
    assert len(ours) == steps + 1 and float(ours[-1]) == 0.0
    np.testing.assert_allclose(ours[:-1].numpy(), expected, rtol=1e-12)
