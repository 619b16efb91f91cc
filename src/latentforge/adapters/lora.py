"""LoRA and LyCORIS files merged into a loaded model through the ``ModelPatcher``.

Formats (per module of the file; names translated by ``adapters.keys``):

- LoRA (Hu et al. 2021, kohya / diffusers / PEFT files): delta = up @ down * alpha / rank, alpha missing
  means alpha = rank; LoCon applies the same to convolutions (down a k x k conv, up a 1x1 conv) and its
  Tucker form adds ``lora_mid`` (delta[p, r, k, l] = sum up[p, i] mid[i, j, k, l] down[j, r]).
- LoHa (LyCORIS, Hadamard product): delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, rank = w1b rows;
  with ``hada_t1``/``hada_t2`` each factor is the Tucker product t x_0 w_a x_1 w_b.
- LoKr (LyCORIS, Kronecker product): delta = kron(w1, w2) with each factor given whole or as a low-rank
  a @ b (``lokr_t2``: Tucker); the alpha / rank scale applies only when a factor is low-rank, else 1.
- DoRA (Liu et al. 2024, ``dora_scale`` or PEFT's ``lora_magnitude_vector``): the merged weight
  W + delta is renormalised to the stored magnitude, per output channel when the magnitude has the
  output's length (PEFT, LyCORIS ``wd_on_out``), per input channel otherwise; a strength s gives
  W + s * (DoRA(W) - W).
- LyCORIS ``diff``: a full weight difference.

Deltas are computed in float32 from the file's factors inside the patch function, so a remove restores
the loaded weights bit for bit (the patcher keeps the backup). A file whose modules do not all match the
model is refused before anything is changed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latentforge.adapters.keys import Target, model_index, split_key
from latentforge.io.components import require_finite
from latentforge.io.hashing import addnet_hash
from latentforge.io.tensorfile import CheckpointError, open_tensor_file, short


class LoraError(ValueError):
    """An adapter file does not fit the model or cannot be read; the message names the file."""


@dataclass
class LoraFile:
    """The modules of an adapter file: file module name -> {part: tensor}."""

    path: Path
    modules: dict[str, dict[str, Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)  # tensor names of no known format

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for parts in self.modules.values():
            k = module_kind(parts)
            counts[k] = counts.get(k, 0) + 1
        return counts


def read_lora(path: str | Path) -> LoraFile:
    """Read every tensor of a LoRA/LyCORIS file (``.safetensors``, or a pickle read with weights_only)."""
    path = Path(path)
    try:
        f = open_tensor_file(path)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    modules: dict[str, dict[str, Tensor]] = {}
    unknown = []
    try:
        for key in f.keys():
            split = split_key(key)
            if split is None:
                unknown.append(key)
                continue
            module, part = split
            modules.setdefault(module, {})[part] = _checked(path, key, part, f.read(key, torch.float32))
        metadata = dict(f.metadata)
    finally:
        f.close()
    # modules holding only an alpha carry nothing to apply (kohya writes them for dropped layers)
    modules = {m: p for m, p in modules.items() if set(p) - {"alpha"}}
    if not modules:
        raise LoraError(
            f"{path} holds no LoRA/LyCORIS weights (no lora_down/lora_up, lora_A/lora_B, hada_, lokr_ tensors)"
            + (f"; its first keys are {', '.join(unknown[:3])}" if unknown else "")
        )
    for name, parts in modules.items():
        for part, t in parts.items():
            if part != "alpha" and t.numel() == 0:
                raise LoraError(
                    f"{path}: module {short(name)} has an empty {part} factor (shape {list(t.shape)}: rank 0), "
                    "which changes nothing and cannot be scaled by alpha / rank; the file is damaged; nothing was "
                    "applied"
                )
    return LoraFile(path, modules, metadata, unknown)


def _checked(path: Path, key: str, part: str, t: Tensor) -> Tensor:
    """A LoRA tensor that cannot poison the model: finite, and an alpha holds one number."""
    if part == "alpha" and t.numel() != 1:
        raise LoraError(
            f"{path}: {short(key)} has shape {list(t.shape)}; an alpha is one number. The file is damaged or not "
            "a LoRA; nothing was applied"
        )
    why = (
        "merging it would ruin the model's weights. The file is damaged (or was saved from a diverged training "
        "run); nothing was applied"
    )
    return require_finite(t, f"{path}: tensor {short(key)}", LoraError, why)


def module_kind(parts: dict[str, Tensor]) -> str:
    if "up" in parts:
        return "dora" if "dora_scale" in parts else ("locon-tucker" if "mid" in parts else "lora")
    if "hada_w1_a" in parts:
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if "diff" in parts:
        return "diff"
    return "unknown"


def _tucker(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    # t (r1, r2, k, l) contracted with a (r1, out) and b (r2, in) -> (out, in, k, l)
    return torch.einsum("ijkl,ip,jr->prkl", t, a, b)


def _alpha_scale(parts: dict[str, Tensor], rank: int) -> float:
    alpha = parts.get("alpha")
    if alpha is not None and rank <= 0:  # read_lora refuses empty factors; this is for other callers
        raise LoraError(f"a factor has rank {rank}; alpha / rank is undefined")
    return 1.0 if alpha is None else float(alpha) / rank


def delta(parts: dict[str, Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The weight difference a module's factors describe (float32, reshaped to ``shape``), without DoRA
    and without the user's strength. Works on the meta device too (to check shapes)."""
    if "up" in parts:
        up, down = parts["up"].flatten(1), parts["down"]
        rank = down.shape[0]
        if "mid" in parts:
            d = torch.einsum("ijkl,jr,pi->prkl", parts["mid"], down.flatten(1), up)
        else:
            d = up @ down.flatten(1)
        return d.reshape(shape) * _alpha_scale(parts, rank)
    if "hada_w1_a" in parts:
        w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if "hada_t1" in parts:
            w1, w2 = _tucker(parts["hada_t1"], w1a, w1b), _tucker(parts["hada_t2"], w2a, w2b)
        else:
            w1, w2 = w1a @ w1b, w2a @ w2b
        return (w1 * w2).reshape(shape) * _alpha_scale(parts, w1b.shape[0])
    if any(p.startswith("lokr_") for p in parts):
        rank = None
        if "lokr_w1" in parts:
            w1 = parts["lokr_w1"]
        else:
            w1, rank = parts["lokr_w1_a"] @ parts["lokr_w1_b"], parts["lokr_w1_b"].shape[0]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        elif "lokr_t2" in parts:
            w2, rank = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]), parts["lokr_w2_b"].shape[0]
        else:
            w2, rank = parts["lokr_w2_a"] @ parts["lokr_w2_b"], parts["lokr_w2_b"].shape[0]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        scale = 1.0 if rank is None else _alpha_scale(parts, rank)
        return torch.kron(w1, w2).reshape(shape) * scale
    if "diff" in parts:
        return parts["diff"].reshape(shape)
    raise LoraError(f"module with parts {sorted(parts)} is no LoRA, LoHa, LoKr or diff module")


def dora(weight: Tensor, merged: Tensor, magnitude: Tensor, strength: float) -> Tensor:
    """DoRA: ``merged`` (W + delta) rescaled to ``magnitude`` per output (or input) channel; the strength
    interpolates between W and that. The magnitude's shape tells the axis: [out] or [out, 1, ...] per output
    channel (PEFT, LyCORIS ``wd_on_out``), [1, in, ...] per input channel."""
    per_input = magnitude.dim() > 1 and magnitude.shape[0] == 1 and merged.shape[0] != 1
    if not per_input:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        scaled = merged * (magnitude.reshape(-1) / norm).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        scaled = merged * (magnitude.reshape(-1) / norm).reshape(1, -1, *[1] * (merged.dim() - 2))
    return weight + strength * (scaled - weight)


def _patch_fn(parts: dict[str, Tensor], full_shape: tuple[int, ...], third: int | None, strength: float):
    def fn(weight: Tensor) -> Tensor:
        on = {k: v if k == "alpha" else v.to(weight.device) for k, v in parts.items()}
        d = delta(on, full_shape)
        if third is not None:
            rows = full_shape[0] // 3
            d = d[third * rows : (third + 1) * rows]
        if "dora_scale" in on:
            return dora(weight, weight + d, on["dora_scale"], strength)
        return weight + strength * d

    return fn


@dataclass
class AppliedLora:
    """What ``apply_lora`` did: the patcher source, the file's hash and how many modules it changed."""

    source: str
    path: Path
    unet_modules: int
    text_modules: int
    hash: str


def match(lora: LoraFile, index: dict[str, Target]) -> tuple[dict[str, Target], list[str]]:
    """(file module -> target) for the modules the model has, and the names it does not have."""
    found, missing = {}, []
    for name in lora.modules:
        if name in index:
            found[name] = index[name]
        else:
            missing.append(name)
    return found, missing


def _mismatch_message(lora: LoraFile, found: dict, missing: list[str], index: dict, family: str) -> str:
    total = len(lora.modules)
    examples = []
    for name in missing[:3]:
        close = difflib.get_close_matches(name, index.keys(), n=1, cutoff=0.8)
        examples.append(name + (f" (closest in the model: {close[0]})" if close else ""))
    guess = guess_family(lora)
    hint = f" The file looks like a LoRA for {guess}." if guess and guess != family else ""
    return (
        f"{lora.path}: only {len(found)} of {total} LoRA modules match this {family} model, e.g. no "
        f"{'; no '.join(examples)}.{hint} Use a LoRA made for {family}; nothing was applied."
    )


def apply_lora(
    pipe,
    path: str | Path,
    *,
    strength: float = 1.0,
    text_strength: float | None = None,
    source: str | None = None,
) -> AppliedLora:
    """Merge a LoRA/LyCORIS file into ``pipe``'s UNet (``strength``) and text encoders (``text_strength``,
    default ``strength``) through ``pipe.patcher`` under ``source`` (default ``lora:<file stem>``); an
    earlier application under the same source is replaced. Undo with ``pipe.patcher.remove(source)``."""
    path = Path(path)
    lora = read_lora(path)
    text_strength = strength if text_strength is None else text_strength
    nets = pipe.networks()
    index = model_index(nets, pipe.unet.config.num_res_blocks)
    found, missing = match(lora, index)
    if missing or lora.unknown:
        if not missing:
            raise LoraError(
                f"{path}: tensors of no known LoRA/LyCORIS format: {', '.join(lora.unknown[:3])}"
                f"{' ...' if len(lora.unknown) > 3 else ''}; nothing was applied"
            )
        raise LoraError(_mismatch_message(lora, found, missing, index, pipe.family.name))
    patches: dict[str, object] = {}
    counts = {"unet": 0, "text": 0}
    for name, target in found.items():
        parts = lora.modules[name]
        net = target[0][0]
        s = strength if net == "unet" else text_strength
        counts["unet" if net == "unet" else "text"] += 1
        if s == 0:
            continue
        weight_shape = tuple(nets[net].get_parameter(target[0][1]).shape)
        full = (weight_shape[0] * len(target), *weight_shape[1:])
        try:  # on the meta device: shapes only, nothing computed or allocated
            meta = {k: v if k == "alpha" else v.to("meta") for k, v in parts.items()}
            shape = delta(meta, full).shape
            if "dora_scale" in parts and tuple(shape) == full:
                weight = torch.empty(full, device="meta")
                shape = dora(weight, weight, meta["dora_scale"], 1.0).shape
        except (RuntimeError, LoraError, IndexError, KeyError, ValueError) as e:  # factors of the wrong rank or kind
            why = f"it has no {e.args[0]!r} factor" if isinstance(e, KeyError) else short(str(e), 200)
            raise LoraError(
                f"{path}: module {name} does not fit {net}.{target[0][1]} {list(weight_shape)} "
                f"({why}); the file is for another model; nothing was applied"
            ) from None
        if "dora_scale" in parts and len(target) > 1:
            raise LoraError(f"{path}: module {name} is DoRA on a fused q/k/v projection, which is not supported")
        if len(shape) != len(full) or tuple(shape) != full:
            raise LoraError(
                f"{path}: module {name} gives a {list(shape)} change for {net}.{target[0][1]} {list(weight_shape)}; "
                "the file is for another model; nothing was applied"
            )
        for network, param, third in target:
            patches[f"{network}.{param}"] = _patch_fn(parts, full, third, s)
    source = source or f"lora:{path.stem}"
    pipe.patcher.remove(source)
    pipe.patcher.patch(source, patches)
    applied = AppliedLora(source, path, counts["unet"], counts["text"], addnet_hash(path))
    pipe.patcher.describe(source, AdapterRecord("lora", path.resolve(), strength, text_strength, applied.hash[:12]))
    return applied


@dataclass(frozen=True)
class AdapterRecord:
    """What an adapter applied under a patcher source (``ModelPatcher.describe``): the images' infotext
    hashes and JSON record name the ones applied to the pipeline for good (``Pipeline.applied_networks``)."""

    kind: str  # "lora" or "hypernet"
    path: Path
    strength: float
    text_strength: float | None
    hash: str  # 12 hex digits, as the infotext writes it


# cross-attention context width (input of attn2.to_k) -> family
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}


def _input_width(parts: dict[str, Tensor]) -> int | None:
    for key in ("down", "hada_w1_b", "lokr_w1_b"):
        if key in parts:
            return parts[key].shape[1]
    return None


def guess_family(lora: LoraFile) -> str | None:
    """The family a LoRA was made for, from its text-encoder prefixes and cross-attention width."""
    for name, parts in lora.modules.items():
        if "attn2" in name and ("to_k" in name or "to_v" in name):
            width = _input_width(parts)
            if width in _CONTEXT_FAMILY:
                return _CONTEXT_FAMILY[width]
    names = list(lora.modules)
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "sdxl-base"
    if any(n.startswith("lora_unet_input_blocks") for n in names):
        return "sdxl-base"
    return None
