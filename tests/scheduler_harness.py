"""Run a diffusers scheduler and a latentforge sampler on the same model function and noise."""

from __future__ import annotations

import inspect

import torch

from latentforge.sampling import Cond, ModelDenoiser, NoiseSchedule, get_sigmas


def model_fn(x_in: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: smooth in x, gently dependent on the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    mix = torch.tensor([[0.9, -0.2, 0.1, 0.0], [0.1, 0.8, 0.0, -0.3], [-0.2, 0.1, 0.7, 0.2], [0.0, 0.3, -0.1, 0.9]])
    y = torch.einsum("oc,bchw->bohw", mix, x_in)
    return torch.tanh(y) * 0.9 + 0.05 * torch.cos(t / 300.0) + 0.02 * x_in.roll(1, dims=-1)


class FakeUNet:
    def __call__(self, x, t, context, y=None):
        return model_fn(x, t)


def diffusers_run(scheduler, noise: torch.Tensor, steps: int, seed: int | None):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def our_run(
    sampler,
    schedule_name: str,
    noise: torch.Tensor,
    steps: int,
    prediction: str,
    *,
    seed: int | None = None,
    quantize: bool = False,
    noise_source=None,
    sigmas=None,
    start_scale: float | None = None,
    **options,
):
    """``start_scale``: the starting noise multiplier (default sqrt(1 + sigma_max^2), the VP schedulers'
    unit-variance start expressed in sigma form)."""
    schedule = NoiseSchedule()
    sigmas = get_sigmas(schedule_name, schedule, steps) if sigmas is None else sigmas
    model = ModelDenoiser(FakeUNet(), schedule, prediction, quantize_timesteps=quantize)
    cond = Cond(torch.zeros(noise.shape[0], 1, 1))

    def denoise(x, sigma):
        return model(x, sigma, cond)

    x = noise * (start_scale if start_scale is not None else (1 + float(sigmas[0]) ** 2) ** 0.5)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return sampler(denoise, x, sigmas, generator=generator, noise=noise_source, **options), sigmas
