"""Finding a checkpoint's family from its signature, and deciding eps or v prediction.

Detection must find exactly one structure; families that share a structure (sd2 and sd2-v) differ
only in their parameterisation, which ``resolve_prediction`` decides in a fixed, reported order:
an explicit setting, a sidecar ``.yaml``, what the file itself records, a probe run of the UNet (only
where the structure is ambiguous), the family default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from latentforge.families.base import Family, Prediction, Signature, families, get_family
from latentforge.io.tensorfile import CheckpointError, short

MAX_SIDECAR_BYTES = 2**20  # an original-format .yaml is a few KB


class DetectionError(ValueError):
    """No single family fits a checkpoint; the message names the file, what was found and the nearest."""


def describe_signature(sig: Signature) -> str:
    return (
        f"UNet in_channels={sig.unet_in}, label={sig.label}, projection={sig.proj}, levels={sig.levels}, "
        f"attention at levels {list(sig.attn_levels)}, text encoders {list(sig.text) or 'none'}, "
        f"VAE levels={sig.vae_levels}"
    )


def candidates(sig: Signature, layout: str, source: str, forced: str | None = None) -> list[Family]:
    """The families whose structure is ``sig``; raises DetectionError when there are none."""
    if forced is not None:
        fam = get_family(forced)
        diff = sig.differences(fam.signature(layout))
        if diff:
            raise DetectionError(f"{source} cannot be loaded as {fam.name}: expected {'; '.join(diff)}")
        return [fam]
    found = [f for f in families() if f.signature(layout) == sig]
    if found:
        return found
    ranked = sorted(families(), key=lambda f: len(sig.differences(f.signature(layout))))
    near = "\n".join(f"  {f.name}: differs in {'; '.join(sig.differences(f.signature(layout)))}" for f in ranked[:3])
    raise DetectionError(
        f"{source} matches no known model family.\nFound: {describe_signature(sig)}.\nNearest families:\n{near}\n"
        "If this is a Stable Diffusion checkpoint of a supported family, it may be incomplete; "
        "`latentforge inspect` lists what it holds."
    )


@dataclass(frozen=True)
class PredictionHint:
    prediction: Prediction
    source: str


def parse_prediction(value: str) -> Prediction:
    v = value.strip().strip("'\"").lower()
    if v in ("eps", "epsilon"):
        return "eps"
    if v in ("v", "v_prediction", "v-prediction"):
        return "v"
    raise ValueError(f"unknown prediction type {short(value)}; use 'eps' or 'v'")


@dataclass(frozen=True)
class SidecarConfig:
    """What latentforge reads from an original-format ``.yaml`` next to a checkpoint."""

    path: Path
    prediction: Prediction | None
    num_heads: int | None
    head_channels: int | None


def read_sidecar(checkpoint: Path) -> SidecarConfig | None:
    """The ``.yaml`` with the checkpoint's name, if any: parameterization and the UNet's head settings."""
    path = checkpoint.with_suffix(".yaml")
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise CheckpointError(
            f"{path} is {path.stat().st_size} bytes long; an original-format model config is a few KB "
            "(move it away if it is not this checkpoint's config)"
        )
    text = path.read_text(encoding="utf-8", errors="replace")

    # each pattern stays within a line ([ \t]*, not \s*, which crossed newlines and backtracked: quadratic
    # in the number of blank lines, hours for a hostile 1 MiB file)
    def number(name: str) -> int | None:
        m = re.search(rf"^[ \t]*{name}:[ \t]*(-?\d+)", text, re.M)
        if m and len(m.group(1)) > 6:
            raise CheckpointError(f"{path}: {name} is {short(m.group(1))}, far above any real model")
        return int(m.group(1)) if m and int(m.group(1)) > 0 else None  # -1 means unset in these files

    m = re.search(r"^[ \t]*parameterization:[ \t]*(\S+)", text, re.M)
    try:
        prediction = parse_prediction(m.group(1)) if m else None
    except ValueError as e:
        raise CheckpointError(f"{path}: parameterization: {e}") from None
    return SidecarConfig(path, prediction, number("num_heads"), number("num_head_channels"))


def probe_prediction(unet: torch.nn.Module) -> tuple[Prediction, float]:
    """Run the UNet once on a constant input at t=999 (x = 0.5, context = 0.5): a v model's output
    minus x averages well below -1, an eps model's does not. Used only for structurally ambiguous
    files (SD2 512 eps vs 768 v) with no other hint."""
    cfg = unet.config
    param = next(unet.parameters())
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    ctx = torch.full((1, 77, cfg.context_dim), 0.5, dtype=param.dtype, device=param.device)
    y = None
    if cfg.num_classes:
        y = torch.zeros(1, dtype=torch.long, device=param.device)
    elif cfg.adm_in_channels:
        y = torch.zeros(1, cfg.adm_in_channels, dtype=param.dtype, device=param.device)
    with torch.inference_mode():
        out = unet(x, torch.tensor([999.0], device=param.device), ctx, y)
    score = float((out.float() - x.float()).mean())
    return ("v" if score < -1.0 else "eps"), score


def resolve_prediction(
    found: list[Family],
    explicit: str | None,
    hints: list[PredictionHint],
    probe: Callable[[], tuple[Prediction, float]],
) -> tuple[Family, Prediction, str]:
    """(family, prediction, how it was decided)."""
    if explicit is not None:
        pred, how = parse_prediction(explicit), f"explicit setting prediction={explicit!r}"
    elif hints:
        pred, how = hints[0].prediction, hints[0].source
    elif len({f.prediction for f in found}) > 1:
        pred, score = probe()
        how = f"probe of the UNet (mean(output - x) = {score:.3f}; below -1 means v)"
    else:
        pred, how = found[0].prediction, f"default of family {found[0].name}"
    same = [f for f in found if f.prediction == pred]
    return (same or found)[0], pred, how
