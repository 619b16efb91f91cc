"""Shared training machinery: optimizer and schedule, EMA, mixed precision, resumable state files.

Training state is saved without pickle: tensors (weights, EMA, optimizer moments) in a safetensors
file and scalars (step, optimizer hyper-parameters) in JSON, written to a temporary folder that then
replaces the previous state, so an interruption never leaves a half-written state behind.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentforge.device import supports_bf16
from latentforge.io.writer import atomic_dir, write_safetensors
from latentforge.pipelines.numerics import NonFiniteError
from latentforge.train.config import TrainConfig, config_to_dict
from latentforge.train.resume import read_state, refuse


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and supports_bf16(device)):
        return torch.bfloat16
    return None


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at the last step."""
    if cfg.lr_warmup and step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "cosine":
        span = max(cfg.steps - cfg.lr_warmup, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step - cfg.lr_warmup, span) / span))
    return cfg.lr


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.shadow = {
            f"{name}.{k}": p.detach().clone().float()
            for name, m in modules.items()
            for k, p in m.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, m in modules.items():
            for k, p in m.named_parameters():
                key = f"{name}.{k}"
                if key in self.shadow:
                    self.shadow[key].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            for k, p in m.named_parameters():
                key = f"{name}.{k}"
                if key in self.shadow:
                    p.copy_(self.shadow[key].to(p.dtype))


def deterministic_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one (step, micro-batch): every random draw of training is a function of the
    position in training, so a resumed run draws exactly what an uninterrupted run would."""
    mixed = seed
    for k in keys:
        mixed = (mixed * 6364136223846793005 + k * 1442695040888963407 + 1) % (2**63)
    return torch.Generator().manual_seed(mixed)


# --- state files -----------------------------------------------------------------------------------

STATE_DIR = "state"


def save_state(
    out: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA | None,
    cfg: TrainConfig,
    extra: dict | None = None,
) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"step": step, "config": config_to_dict(cfg), "optimizers": {}, "extra": extra or {}}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().contiguous()
    if ema is not None:
        for k, v in ema.shadow.items():
            tensors[f"ema.{k}"] = v.contiguous()
    for oname, opt in optimizers.items():
        sd = opt.state_dict()
        meta["optimizers"][oname] = {"param_groups": sd["param_groups"], "state_keys": {}}
        for idx, st in sd["state"].items():
            meta["optimizers"][oname]["state_keys"][str(idx)] = sorted(st)
            for k, v in st.items():
                tensors[f"opt.{oname}.{idx}.{k}"] = torch.as_tensor(v).contiguous()
    final = out / STATE_DIR
    # written beside it and swapped in whole; the old state is removed only once the new one is in place,
    # and no fixed name (a user's ".state.old") is ever deleted (io/writer.atomic_dir)
    with atomic_dir(final, overwrite=True) as tmp:
        write_safetensors(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    return final


def has_state(out: Path) -> bool:
    """True when ``out`` holds a state folder (whole or not: ``load_state`` says what is wrong with it)."""
    return (out / STATE_DIR).is_dir()


def load_state(
    out: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA | None,
    cfg: TrainConfig | None = None,
) -> tuple[int, dict]:
    """Restore a saved state; returns (step, extra). Everything is checked before anything is restored:
    a missing, truncated or corrupt file, other tensor names or shapes, non-finite values, or a state
    saved for another model (``cfg``'s mode, model.base, model.family, model.train_text_encoder) raise
    ConfigError naming the problem (see train/resume.py)."""
    folder = out / STATE_DIR
    meta, tensors = read_state(folder, modules, optimizers, ema, cfg)
    try:
        for name, m in modules.items():
            prefix = f"model.{name}."
            m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if ema is not None:
            for k in ema.shadow:
                ema.shadow[k] = tensors[f"ema.{k}"].float()
        for oname, opt in optimizers.items():
            saved = meta["optimizers"][oname]
            state = {
                int(idx): {k: tensors[f"opt.{oname}.{idx}.{k}"] for k in keys}
                for idx, keys in saved["state_keys"].items()
            }
            opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:  # what the checks above did not foresee
        raise refuse(folder, f"it does not restore into this model ({type(e).__name__}: {str(e)[:200]})") from None
    return int(meta["step"]), meta.get("extra", {})


# --- non-finite values ----------------------------------------------------------------------------


class TrainingDiverged(NonFiniteError):
    """The loss, the gradients or the weights became NaN/Inf; nothing of that step was written."""


def _advice(cfg: TrainConfig, out: Path) -> str:
    kept = (
        f"the last good state in {out / STATE_DIR} is kept (the same command resumes from it)"
        if has_state(out)
        else "no state or checkpoint of this run was written after the first non-finite value"
    )
    clip = "lower grad_clip" if cfg.grad_clip > 0 else "set grad_clip = 1.0"
    return (
        f"Lower the learning rate (lr = {cfg.lr:g}; try 10 times smaller), {clip}, or set "
        f"mixed_precision = 'no' if reduced precision overflows; {kept}"
    )


def grad_norm(params: list[nn.Parameter], clip: float) -> float:
    """The total gradient norm (L2 over all parameters), clipped to ``clip`` when it is > 0."""
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def check_step(step: int, loss: float, norm: float, cfg: TrainConfig, out: Path) -> None:
    """Raise TrainingDiverged before the optimizer applies a step whose loss or gradient norm is NaN/Inf."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm} (loss {loss:.4g})"
    raise TrainingDiverged(
        f"training diverged at step {step + 1} of {cfg.steps}: {what}; the step was not applied. {_advice(cfg, out)}"
    )


def check_weights(step: int, modules: dict[str, nn.Module], ema: EMA | None, cfg: TrainConfig, out: Path) -> None:
    """Raise TrainingDiverged if a trained weight (or its EMA) is NaN/Inf; called before anything is
    written, so no sample, state or checkpoint is made from non-finite weights."""
    named = [(f"{n}.{k}", p) for n, m in modules.items() for k, p in m.named_parameters() if p.requires_grad]
    named += [(f"EMA of {k}", v) for k, v in (ema.shadow.items() if ema is not None else ())]
    for name, t in named:
        if not bool(torch.isfinite(t.detach()).all()):
            raise TrainingDiverged(
                f"training diverged at step {step + 1} of {cfg.steps}: after the optimizer step the weight "
                f"{name} holds NaN/Inf; nothing was written for this step. {_advice(cfg, out)}"
            )


@dataclass
class TrainProgress:
    step: int
    steps: int
    loss: float
    lr: float
    seconds: float
    samples_per_second: float
    message: str = ""


class LossMeter:
    def __init__(self, beta: float = 0.95):
        self.beta, self.value, self.n = beta, 0.0, 0

    def add(self, x: float) -> float:
        self.n += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.value / (1 - self.beta**self.n)


class Reporter:
    """Calls ``callback`` with TrainProgress every ``every`` steps (and at the end)."""

    def __init__(self, callback: Callable[[TrainProgress], None] | None, every: int, steps: int, batch: int):
        self.callback, self.every, self.steps, self.batch = callback, max(every, 1), steps, batch
        self.start, self.meter, self.first_step = time.perf_counter(), LossMeter(), None

    def step(self, step: int, loss: float, lr: float, message: str = "") -> float:
        smoothed = self.meter.add(loss)
        if self.first_step is None:
            self.first_step = step
        if self.callback and ((step + 1) % self.every == 0 or step + 1 == self.steps or message):
            elapsed = time.perf_counter() - self.start
            done = step + 1 - self.first_step
            self.callback(
                TrainProgress(
                    step + 1, self.steps, smoothed, lr, elapsed, done * self.batch / max(elapsed, 1e-9), message
                )
            )
        return smoothed
