"""Denoisers D(x, sigma): the UNet with its parameterisation, and classifier-free guidance over it.

Karras et al. 2022 (EDM) preconditioning for the discrete SD models: c_in = 1 / sqrt(sigma^2 + 1),
the network sees the fractional training timestep of sigma, and
    eps: D(x) = x - sigma * F(c_in x, t)
    v:   D(x) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * F(c_in x, t)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from latentforge.device import filled
from latentforge.sampling.schedules import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma) -> estimate of the clean latent


@dataclass
class Cond:
    """Conditioning of one side of CFG: cross-attention context, the vector input (SDXL sizes and
    pooled text, the upscaler's noise level) and extra input channels (inpaint mask and masked image,
    depth, low-res image), concatenated after the scaled latent."""

    context: Tensor
    vector: Tensor | None = None
    concat: Tensor | None = None

    def cat(self, other: Cond) -> Cond:
        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return Cond(
            torch.cat([self.context, other.context]), join(self.vector, other.vector), join(self.concat, other.concat)
        )


class CondSchedule:
    """Conditioning that changes during sampling (A1111 prompt editing): entries (last_step, Cond) in
    increasing order; model call k (0-based, counting every call of the guided denoiser) uses the first
    entry with k <= last_step, the last entry after them all. This is A1111's rule, which also counts
    the second evaluation of a second-order step."""

    def __init__(self, entries: list[tuple[float, Cond]]):
        if not entries:
            raise ValueError("a conditioning schedule needs at least one entry")
        self.entries = entries

    def at(self, call: int) -> Cond:
        for last, cond in self.entries:
            if call <= last:
                return cond
        return self.entries[-1][1]


class ModelDenoiser:
    """D(x, sigma, cond) for a noise-predicting UNet (eps or v)."""

    def __init__(self, unet, schedule: NoiseSchedule, prediction: str, *, quantize_timesteps: bool = False):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize_timesteps

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) with D(x) = c_skip x + c_out F(c_in x, t); sigma shaped to broadcast."""
        c_in = (sigma**2 + 1).rsqrt()
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in

    def network_input(self, x: Tensor, sigma: Tensor, cond: Cond) -> tuple[Tensor, Tensor, Tensor]:
        """(scaled input with any concat channels, training timestep, sigma as float32 shaped to broadcast
        over ``x``) for the UNet. ``sigma`` (float64, one per image) normally lives on the CPU: its values
        reach ``x``'s device without a copy when they are equal (``device.filled``)."""
        t = filled(self.schedule.sigma_to_t(sigma, quantize=self.quantize), x.device)
        s = filled(sigma, x.device)[:, None, None, None]
        inp = x * self.scalings(s)[2]
        if cond.concat is not None:
            inp = torch.cat([inp, cond.concat.to(inp.dtype)], dim=1)
        return inp, t, s

    def target(self, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """What the network should output so that D(x) = x0: (x0 - c_skip x) / c_out (eps or v)."""
        c_skip, c_out, _ = self.scalings(sigma)
        return (x0 - c_skip * x) / c_out

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        inp, t, s = self.network_input(x, sigma, cond)
        out = self.unet(inp, t, cond.context, cond.vector).to(x.dtype)
        c_skip, c_out, _ = self.scalings(s)
        return c_skip * x + c_out * out


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale (D_c - D_u), both halves in one
    batch. With scale 1 (or no unconditional side) only the conditional half runs, as A1111 does.
    When the two contexts differ in length (long prompts), each side runs on its own.

    ``cond`` may also be a list of (weight, conditioning): composable diffusion (Liu et al. 2022, A1111's
    ``AND``), D = D_u + sum_i weight_i * scale * (D_i - D_u), all parts batched with the unconditional.

    ``min_uncond_sigma`` (A1111's NGMS, ``s_min_uncond``): below this sigma the unconditional half is
    skipped on every other call (every call with ``min_uncond_all``) and the conditional estimate used.

    ``rescale`` (phi, Lin et al. 2024 section 3.4, diffusers' ``guidance_rescale``): the guided prediction,
    taken in v-space, is scaled to the standard deviation of the conditional one and mixed
    ``phi * rescaled + (1 - phi) * guided``; it keeps zero-terminal-SNR v-models from over-exposing."""

    def __init__(
        self,
        model: ModelDenoiser,
        cond: Cond | CondSchedule | list[tuple[float, Cond | CondSchedule]],
        uncond: Cond | CondSchedule | None,
        scale: float,
        rescale: float = 0.0,
        min_uncond_sigma: float = 0.0,
        min_uncond_all: bool = False,
    ):
        def schedule(c):
            return c if isinstance(c, CondSchedule) or c is None else CondSchedule([(math.inf, c)])

        parts = cond if isinstance(cond, list) else [(1.0, cond)]
        self.parts = [(float(w), schedule(c)) for w, c in parts]
        self.model, self.uncond, self.scale, self.rescale = model, schedule(uncond), float(scale), float(rescale)
        self.calls = 0  # model calls so far: where the prompt schedules are
        # A1111's "Negative Guidance minimum sigma": below it, every other call (or every call) skips the
        # unconditional side and returns the conditional estimate
        self.min_uncond_sigma, self.min_uncond_all = float(min_uncond_sigma), min_uncond_all
        # the unconditional estimate D_u of the last call (the conditional one when no unconditional
        # side ran): what CFG++ samplers step along (see ``last_unconditional``)
        self.last_uncond: Tensor | None = None

    @property
    def cond(self) -> CondSchedule:
        return self.parts[0][1]

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if len(self.parts) > 1 or self.parts[0][0] != 1.0:
            return self._composed(x, sigma)
        c = self.cond.at(self.calls)
        u = None if self.uncond is None else self.uncond.at(self.calls)
        skip = self.min_uncond_sigma > 0 and (self.min_uncond_all or self.calls % 2 == 1)
        skip = skip and float(torch.as_tensor(sigma).reshape(-1)[0]) < self.min_uncond_sigma
        self.calls += 1
        if u is None or self.scale == 1.0 or skip:
            self.last_uncond = self.model(x, sigma, c)
            return self.last_uncond
        if c.context.shape[1:] == u.context.shape[1:]:
            cond, uncond = self.model(torch.cat([x, x]), sigma, c.cat(u)).chunk(2)
        else:
            cond, uncond = self.model(x, sigma, c), self.model(x, sigma, u)
        self.last_uncond = uncond
        guided = uncond + self.scale * (cond - uncond)
        return guided if not self.rescale else self._rescaled(x, sigma, cond, guided)

    def _rescaled(self, x: Tensor, sigma: Tensor | float, cond: Tensor, guided: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out = 1 / (s**2 + 1), -s / (s**2 + 1).sqrt()  # the v parameterisation's scalings

        def v(d: Tensor) -> Tensor:
            return (d - c_skip * x) / c_out

        v_cond, v_guided = v(cond), v(guided)
        dims = list(range(1, x.ndim))
        rescaled = v_guided * (v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True))
        mixed = self.rescale * rescaled + (1 - self.rescale) * v_guided
        return c_skip * x + c_out * mixed

    def _composed(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if self.uncond is None:
            raise ValueError("composable prompts (AND) need the unconditional side")
        conds = [c.at(self.calls) for _, c in self.parts]
        u = self.uncond.at(self.calls)
        self.calls += 1
        everything = [*conds, u]
        if all(c.context.shape[1:] == u.context.shape[1:] for c in conds):
            joined = everything[0]
            for c in everything[1:]:
                joined = joined.cat(c)
            outs = self.model(torch.cat([x] * len(everything)), sigma, joined).chunk(len(everything))
        else:
            outs = [self.model(x, sigma, c) for c in everything]
        uncond = outs[-1]
        self.last_uncond = uncond
        denoised = uncond.clone()
        for (weight, _), out in zip(self.parts, outs[:-1]):
            denoised += (out - uncond) * (weight * self.scale)
        return denoised


class WrappedDenoiser:
    """A guided denoiser under wrappers (e.g. inpainting's masked blend) that keeps the inner guided
    denoiser's ``last_uncond`` reachable for CFG++ samplers."""

    def __init__(self, fn: Denoiser, guided: CFGDenoiser):
        self.fn, self.guided = fn, guided

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return self.fn(x, sigma)

    @property
    def last_uncond(self) -> Tensor | None:
        return self.guided.last_uncond


def last_unconditional(denoise: Denoiser) -> Tensor:
    """The unconditional estimate D_u(x, sigma) of the last call of a guided denoiser (CFG++, Chung et al.
    2024, steps along it). Any denoiser with a ``last_uncond`` attribute qualifies; a plain function
    is taken as unguided, so its own last output is not available and this raises."""
    value = getattr(denoise, "last_uncond", None)
    if value is None:
        raise TypeError(
            "CFG++ samplers need the unconditional estimate: pass a CFGDenoiser (or any denoiser with a "
            "'last_uncond' attribute set on each call)"
        )
    return value
