"""Non-finite values (NaN, Inf) during generation: found where they first appear, reported with a cause.

A NaN or Inf anywhere in sampling spreads to every pixel and used to end as an all-black PNG. Each
sampling step does one reduction (``torch.isfinite(denoised).all()``) on the sampler's estimate of the
clean latents (on a GPU read one step later, so the check never stalls the GPU: ``FiniteWatch``), and the
result of each pass and of the VAE decode are checked once; nothing else runs on the normal path, so
results are bit for bit those of an unchecked run. Only when a check fails is
more inspected (the step's input latents, the conditioning) to say where the values came from.

A VAE running in fp16 can overflow (its largest activations exceed fp16's 65504; the SDXL VAE is the
known case). As A1111 does, such a decode is repeated in fp32 (on a temporary fp32 copy of the VAE,
with a logged warning) and only an overflow in fp32 too is an error.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger("latentforge")

StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]  # (i, x, sigma, denoised), as the samplers call it


class NonFiniteError(RuntimeError):
    """NaN or Inf values appeared in generation (or training); the message says where and what to try."""


def is_finite(t: Tensor) -> bool:
    """True when every value of ``t`` is finite (one reduction)."""
    return bool(torch.isfinite(t).all())


_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def _settings(p) -> str:
    """The pass's numbers that can make latents overflow (sampler options only where not the default)."""
    opts = [
        f"{k} {v:g}"
        for k, v in p.sampler_options.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != _DEFAULTS.get(k)
    ]
    return ", ".join([f"sampler {p.sampler.title}", f"cfg_scale {p.cfg_scale:g}", *opts])


def _conditioning_finite(p) -> bool:
    schedules = [s for _, s in p.cond] if isinstance(p.cond, list) else [p.cond]  # composable parts (AND)
    for schedule in (*schedules, p.uncond):
        if schedule is None:
            continue
        for _, cond in schedule.entries:
            for t in (cond.context, cond.vector, cond.concat):
                if t is not None and not is_finite(t):
                    return False
    return True


_NOISE_CAUSE = "s_noise, eta or s_churn too large; usual values are 0 to about 1.1"
# latents stay within a few times (1 + sigma) of zero; far beyond that, an earlier step overflowed
_HUGE = 1e4


def _model_hint(p, x: Tensor, sigma: float, dtype: torch.dtype | None) -> str:
    """Why the model's output is not finite although its input latents are (the error path only)."""
    if not _conditioning_finite(p):
        return (
            "the prompt's conditioning (the text encoder output) is already NaN/Inf: a prompt weight too large "
            "for floating point, such as (word:1e39), or NaN in the text encoder's weights; use weights between "
            "about 0 and 2"
        )
    cfg = f"cfg_scale {p.cfg_scale:g} is too large (usual values are 1 to 30)" if abs(p.cfg_scale) > 100 else ""
    largest = float(x.abs().max())
    if largest > _HUGE * (1 + sigma):
        return (
            f"the latents entering this step are far too large (largest magnitude {largest:.3g} at sigma "
            f"{sigma:.4g}): earlier steps overflowed ({cfg or _NOISE_CAUSE})"
        )
    if cfg:
        return f"{cfg}: guidance overflows floating point"
    fp16 = "; the UNet runs in fp16 and may overflow: try --dtype bf16 or fp32" if dtype == torch.float16 else ""
    return (
        "the model's output is NaN/Inf for finite input latents: NaN/Inf in the weights (a damaged or badly "
        f"merged checkpoint, or a patch applied to it){fp16}; check the model with a plain prompt and cfg_scale 7"
    )


class _StepCheck:
    """One step's check, read later: ``torch.isfinite(denoised).all()`` queued on the device. On a CUDA
    device the flag travels to page-locked host memory behind the step's work and an event marks it, so
    reading it waits only for that step, not for everything queued since."""

    def __init__(self, i: int, x: Tensor, sigma: Tensor, denoised: Tensor):
        self.i, self.x, self.sigma = i, x, sigma
        flag = torch.isfinite(denoised).all()
        self.event = None
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))  # the stream the copy runs on
            flag = host
        self.flag = flag

    def finite(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.flag)


class FiniteWatch:
    """Watches one sampling pass: ``callback`` wraps the step callback with the per-step check, ``result``
    checks the pass's final latents. Errors name the pass, the step (1-based) and its sigma.

    ``lag`` steps pass before a step's check is read (default: 1 on a CUDA device, else 0). Reading a
    flag waits for the device; with a lag of one step the host has already queued the next step's UNet
    by then, so the GPU never idles waiting for the host (on an H200 the immediate check cost 8 ms of a
    52 ms SDXL step: benchmarks/profile_step.py). A NaN found late still names the step it appeared in,
    and ``result`` reads every check still pending."""

    def __init__(self, p, dtype: torch.dtype | None = None, lag: int | None = None):
        self.p, self.dtype, self.lag = p, dtype, lag
        self.pending: list[_StepCheck] = []

    def callback(self, inner: StepCallback | None) -> StepCallback:
        def check(i: int, x: Tensor, sigma: Tensor, denoised: Tensor) -> None:
            lag = self.lag if self.lag is not None else int(denoised.is_cuda)
            self.pending.append(_StepCheck(i, x, sigma, denoised))
            while len(self.pending) > lag:
                self._read(self.pending.pop(0))
            if inner is not None:
                inner(i, x, sigma, denoised)

        return check

    def flush(self) -> None:
        """Read every check still pending (a NonFiniteError for a NaN found): before a run ends early, so
        that a step's NaN is never handed on as a result."""
        while self.pending:
            self._read(self.pending.pop(0))

    def _read(self, step: _StepCheck) -> None:
        if step.finite():
            return
        self.pending.clear()
        p, i, x, sigma = self.p, step.i, step.x, step.sigma
        where = f"pass '{p.name}', step {i + 1} of {p.steps} (sigma {float(sigma):.4g}; {_settings(p)})"
        if not is_finite(x):
            if i == 0:
                cause = (
                    "the pass's starting latents were already NaN/Inf (the init image's latents, the "
                    "previous pass's result, or the noise times a non-finite sigma)"
                )
            else:
                cause = (
                    "the latents entering this step were already NaN/Inf: the previous step's update or "
                    f"the noise it added overflowed ({_NOISE_CAUSE})"
                )
        else:
            cause = _model_hint(p, x, float(sigma), self.dtype)
        raise NonFiniteError(f"NaN/Inf values in the denoised latents at {where}: {cause}")

    def result(self, x: Tensor) -> Tensor:
        self.flush()
        if not is_finite(x):
            p = self.p
            raise NonFiniteError(
                f"NaN/Inf values in the latents at the end of pass '{p.name}' ({_settings(p)}): the last step's "
                f"update or the noise it added overflowed ({_NOISE_CAUSE}), or the pass's starting latents were "
                "not finite"
            )
        return x


def decode_checked(decode: Callable[[Tensor], Tensor], latents: Tensor) -> Tensor:
    """``decode(latents)`` (a plan's decode: a VAE's ``decode`` method, or any latents -> images function)
    with its result checked. When ``decode`` is the method of an fp16 VAE and overflows, it is repeated on
    an fp32 copy of that VAE (the VAE itself is left as it is).

    ``latents`` must be finite (the sampling checks see to it), so NaN/Inf here come from the decoder.
    """
    images = decode(latents)
    if is_finite(images):
        return images
    vae = getattr(decode, "__self__", None)  # the module of a bound method
    dtype = getattr(vae, "dtype", None)
    if isinstance(vae, torch.nn.Module) and dtype == torch.float16:
        log.warning(
            "the VAE decode overflowed in fp16 (NaN/Inf pixels); decoding again in fp32 as A1111 does. "
            "To avoid the repeated decode, load with --dtype bf16 or fp32 or use an fp16-safe VAE."
        )
        fp32 = copy.deepcopy(vae).float()
        images = getattr(fp32, decode.__name__)(latents.float())
        del fp32
        if is_finite(images):
            return images
        raise NonFiniteError(
            "the VAE decode gave NaN/Inf pixels in fp16 and again in fp32, from finite latents: the VAE's weights "
            "are damaged or do not fit this model (load another VAE with --vae, or the checkpoint's own)"
        )
    name = str(dtype).removeprefix("torch.") if dtype is not None else "decode"
    raise NonFiniteError(
        f"the VAE decode ({name}) gave NaN/Inf pixels from finite latents: the VAE's weights are damaged or "
        "do not fit this model (load another VAE with --vae, or the checkpoint's own)"
    )
