"""The discrete DDPM noise schedule of a family and the sigma schedules samplers step through.

Sigmas follow the "k-diffusion" view (Karras et al. 2022): x = x0 + sigma * eps, with
sigma_t = sqrt((1 - abar_t) / abar_t) from the 1000-step DDPM schedule (computed in float64, as the
original). A sigma schedule is a decreasing tensor of ``steps + 1`` sigmas ending with 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class NoiseSchedule:
    """The training noise schedule: betas = linspace(sqrt(b0), sqrt(b1), N)^2 (LDM "linear")."""

    def __init__(
        self,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        steps: int = 1000,
        ays_table: str = "sd1",
        *,
        zero_terminal_snr: bool = False,
    ):
        if ays_table not in AYS_SIGMAS:
            raise ValueError(f"unknown Align Your Steps table {ays_table!r}; use one of {', '.join(AYS_SIGMAS)}")
        self.ays_table = ays_table  # the family's Align Your Steps levels (Family.ays_table)
        self.zero_terminal_snr = zero_terminal_snr
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def for_family(cls, family, *, zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls(family.beta_start, family.beta_end, ays_table=family.ays_table, zero_terminal_snr=zero_terminal_snr)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """Fractional training timestep whose sigma is ``sigma``, interpolating log-sigma linearly
        between neighbouring steps (k-diffusion's DiscreteSchedule); ``quantize`` rounds to the nearest
        step instead (ComfyUI's convention)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=1e-10).log()
        dists = log_sigma.reshape(1, -1) - self.log_sigmas[:, None]  # (N, k)
        if quantize:
            return dists.abs().argmin(dim=0).to(torch.float64).reshape(sigma.shape)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


# ComfyUI's and A1111's stand-in for the final alpha_bar of 0, which would make the largest sigma infinite
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1:
    shift and scale sqrt(alpha_bar) so the last step has zero SNR while the first keeps its value; the
    final alpha_bar is then set to a tiny positive value so that sigma_max stays finite (as ComfyUI)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def normal(s: NoiseSchedule, n: int) -> Tensor:
    """Timesteps evenly spaced from the last to the first (A1111 "Uniform", ComfyUI "normal")."""
    return _append_zero(s.t_to_sigma(torch.linspace(len(s.sigmas) - 1, 0, n, dtype=torch.float64)))


def karras(s: NoiseSchedule, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = s.sigma_min ** (1 / rho), s.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(s: NoiseSchedule, n: int) -> Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(s.sigma_max), math.log(s.sigma_min), n, dtype=torch.float64).exp())


def polyexponential(s: NoiseSchedule, n: int, rho: float = 1.0) -> Tensor:
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(s.sigma_max) - math.log(s.sigma_min)) + math.log(s.sigma_min)).exp())


def sgm_uniform(s: NoiseSchedule, n: int) -> Tensor:
    """n timesteps from linspace(last, first, n + 1) without its end point (SGM/SDXL's discretization)."""
    t = torch.linspace(len(s.sigmas) - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(s.t_to_sigma(t))


def simple(s: NoiseSchedule, n: int) -> Tensor:
    """Every (N/n)-th training sigma from the top (ComfyUI "simple")."""
    stride = len(s.sigmas) / n
    return _append_zero(torch.stack([s.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_uniform(s: NoiseSchedule, n: int) -> Tensor:
    """Training steps 1, 1 + k, 1 + 2k, ... with k = N // n, from the top: DDIM's uniform
    discretization with step offset 1 (diffusers "leading" spacing). Like ComfyUI and A1111, a step
    count that does not divide N gives one step more."""
    k = max(len(s.sigmas) // n, 1)
    return _append_zero(s.sigmas[1::k].flip(0))


def beta(s: NoiseSchedule, n: int, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024, "beta sampling")."""
    from scipy.stats import beta as beta_dist

    total = len(s.sigmas) - 1
    ts = [round(float(beta_dist.ppf(q, alpha, beta_)) * total) for q in (1 - torch.linspace(0, 1, n + 1)[:-1]).tolist()]
    picked, last = [], None
    for t in ts:
        if t != last:
            picked.append(s.sigmas[t])
        last = t
    return _append_zero(torch.stack(picked))


def kl_optimal(s: NoiseSchedule, n: int) -> Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024)."""
    w = torch.linspace(0, 1, n, dtype=torch.float64)
    return _append_zero(torch.tan(w * math.atan(s.sigma_min) + (1 - w) * math.atan(s.sigma_max)))


def lcm(s: NoiseSchedule, n: int, original_steps: int = 50) -> Tensor:
    """The timesteps LCM models were distilled on, (N // 50) * k - 1 for k = 1..50, of which n are
    taken at evenly spaced positions from the top (Luo et al. 2023; diffusers' LCMScheduler)."""
    origin = (torch.arange(1, original_steps + 1) * (len(s.sigmas) // original_steps) - 1).flip(0)
    picks = torch.floor(torch.arange(min(n, original_steps)) * (original_steps / min(n, original_steps))).long()
    return _append_zero(s.sigmas[origin[picks]])


def linear_quadratic(
    s: NoiseSchedule, n: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """ComfyUI's ``linear_quadratic`` (from Genmo's Mochi): as fractions of sigma_max, the first
    ``linear_steps`` (n // 2) levels fall linearly from 1 by ``threshold_noise`` in all, the rest follow
    the quadratic that continues the line and reaches 0 at step n."""
    if n == 1:
        return _append_zero(torch.tensor([s.sigma_max], dtype=torch.float64))
    linear_steps = n // 2 if linear_steps is None else linear_steps
    levels = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    quadratic_steps = n - linear_steps
    diff = linear_steps - threshold_noise * n
    a = diff / (linear_steps * quadratic_steps**2)
    b = threshold_noise / linear_steps - 2 * diff / quadratic_steps**2
    c = a * linear_steps**2
    levels += [a * i**2 + b * i + c for i in range(linear_steps, n)]
    return _append_zero((1.0 - torch.tensor(levels, dtype=torch.float64)) * s.sigma_max)


# Align Your Steps (Sabour, Fidler and Kreis 2024): the 11 noise levels NVIDIA published for 10-step
# sampling with SD1.5 and with SDXL (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html).
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def align_your_steps(s: NoiseSchedule, n: int) -> Tensor:
    """A1111's use of the AYS levels: the family's table (SDXL's for SDXL families, SD1.5's otherwise); for
    n = 11 steps the 11 levels themselves, for any other n, n levels interpolated linearly in
    log-sigma over evenly spaced positions of the table; then a final 0. (ComfyUI's node and
    diffusers' AysSchedules instead take 10 steps to mean the table with its last level set to 0. For
    n = 1 A1111's interpolation yields the lowest level, 0.029; here the one step starts at the top.)"""
    table = torch.tensor(AYS_SIGMAS[s.ays_table], dtype=torch.float64)
    if n == len(table):
        return _append_zero(table)
    positions = torch.linspace(0, len(table) - 1, n, dtype=torch.float64)
    low = positions.floor().long().clamp(max=len(table) - 2)
    w = positions - low
    logs = table.log()
    return _append_zero(((1 - w) * logs[low] + w * logs[low + 1]).exp())


SCHEDULES: dict[str, Callable[[NoiseSchedule, int], Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "kl_optimal": kl_optimal,
    "lcm": lcm,
    "align_your_steps": align_your_steps,
    "linear_quadratic": linear_quadratic,
}
# A1111's names (its 1.9+ "Schedule type" menu) and other spellings users type
SCHEDULE_ALIASES = {
    "uniform": "normal",
    "automatic": "automatic",
    "sgm uniform": "sgm_uniform",
    "kl optimal": "kl_optimal",
    "ddim": "ddim_uniform",
    "align your steps": "align_your_steps",
    "ays": "align_your_steps",
    "linear quadratic": "linear_quadratic",
}


def schedule_name(name: str) -> str:
    """Our name for a schedule typed in any known spelling (``automatic`` is kept for the sampler)."""
    key = name.strip().lower().replace("-", "_")
    key = SCHEDULE_ALIASES.get(key, SCHEDULE_ALIASES.get(key.replace("_", " "), key))
    if key == "automatic" or key in SCHEDULES:
        return key
    raise ValueError(f"unknown schedule {name!r}; choose one of: automatic, {', '.join(SCHEDULES)}")


def get_sigmas(name: str, schedule: NoiseSchedule, steps: int) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return SCHEDULES[schedule_name(name)](schedule, steps)
