"""LoRA and LyCORIS files merged into a loaded model through the ``ModelPatcher``.

The formats and their math (LoRA/LoCon, LoHa, LoKr, DoRA, LyCORIS full ``diff``/``diff_b`` and norm
``w_norm``/``b_norm``, A1111's ``dyn``, and the kinds whose change is a function of the layer's weight: IA3,
OFT/BOFT, GLoRA) are in ``adapters.lora_kinds``; module names are translated by ``adapters.keys``.

Deltas are computed in float32 from the file's factors inside the patch function, so a remove restores
the loaded weights bit for bit (the patcher keeps the backup). As A1111 (which applies the modules it
finds and leaves the others, ``keys_failed_to_match``), a file whose modules mostly match the model
(at least half; tensors of no format latentforge knows count as modules that do not match) is applied
without the others, with a warning naming them; a file of which fewer match (a LoRA for another family)
is refused before anything is changed, with what it looks made for. A module that matches by name but
whose factors do not fit its layer refuses the whole file. A 4-channel ``conv_in`` change on an
inpainting model's 9-channel ``conv_in`` is zero-padded, as A1111 does. IA3, OFT and GLoRA modules on a
fused q/k/v projection or on a 9-channel ``conv_in`` refuse the file (A1111 cannot apply them there
either), and so do their parts when they do not fit the layer's weight.

Textual-inversion embeddings bundled in the file (``bundle_emb.<name>.string_to_param.*``,
``bundle_emb.<name>.clip_l``/``clip_g``) are read into ``LoraFile.bundled``; ``pipelines.networks``
registers them while the LoRA is active.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latentforge.adapters.keys import Target, model_index, split_key
from latentforge.adapters.lora_kinds import (
    BIAS_PARTS,
    DORA_PARTS,
    SCALAR_PARTS,
    WEIGHT_KINDS,
    LoraError,
    bias_delta,
    bias_patch,
    weight_change,
    weight_patch,
)
from latentforge.adapters.lora_kinds import delta as delta  # re-exported (train.lora, users)
from latentforge.adapters.lora_kinds import dora as dora
from latentforge.adapters.lora_kinds import module_kind as module_kind
from latentforge.io.components import require_finite
from latentforge.io.hashing import addnet_hash
from latentforge.io.tensorfile import CheckpointError, open_tensor_file, short

log = logging.getLogger(__name__)
__all__ = ["AdapterRecord", "AppliedLora", "LoraError", "LoraFile", "apply_lora", "delta", "dora", "read_lora"]


@dataclass
class LoraFile:
    """The modules of an adapter file: file module name -> {part: tensor}."""

    path: Path
    modules: dict[str, dict[str, Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)  # tensor names of no known format
    bundled: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # embedding name -> {vector name: tensor}

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
    unknown, bundled = [], {}
    try:
        for key in f.keys():
            head, _, rest = key.partition(".")
            if head == "bundle_emb" and "." in rest:  # A1111: bundle_emb.<embedding>.<vector name>
                emb, _, vec = rest.partition(".")
                bundled.setdefault(emb, {})[vec] = f.read(key)
                continue
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
    if not modules and not bundled:
        raise LoraError(
            f"{path} holds no LoRA/LyCORIS weights (no lora_down/lora_up, lora_A/lora_B, hada_, lokr_, oft_blocks, "
            "IA3 or GLoRA tensors)" + (f"; its first keys are {', '.join(unknown[:3])}" if unknown else "")
        )
    for name, parts in modules.items():
        for part, t in parts.items():
            if part != "alpha" and t.numel() == 0:
                raise LoraError(
                    f"{path}: module {short(name)} has an empty {part} factor (shape {list(t.shape)}: rank 0), "
                    "which changes nothing and cannot be scaled by alpha / rank; the file is damaged; nothing was "
                    "applied"
                )
    return LoraFile(path, modules, metadata, unknown, bundled)


def _checked(path: Path, key: str, part: str, t: Tensor) -> Tensor:
    """A LoRA tensor that cannot poison the model: finite, and an alpha (IA3's on_input) holds one number."""
    if part in SCALAR_PARTS and t.numel() != 1:
        raise LoraError(
            f"{path}: {short(key)} has shape {list(t.shape)}; an {part} is one number. The file is damaged or not "
            "a LoRA; nothing was applied"
        )
    why = (
        "merging it would ruin the model's weights. The file is damaged (or was saved from a diverged training "
        "run); nothing was applied"
    )
    return require_finite(t, f"{path}: tensor {short(key)}", LoraError, why)


@dataclass
class AppliedLora:
    """What ``apply_lora`` did: the patcher source, the file's hash, how many modules it changed, the file
    modules it left out (no such layer in the model, or a kind latentforge does not know) and the
    embeddings bundled in the file (name -> {vector name: tensor}, for ``pipelines.networks``)."""

    source: str
    path: Path
    unet_modules: int
    text_modules: int
    hash: str
    skipped: list[str] = field(default_factory=list)
    bundled: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def match(lora: LoraFile, index: dict[str, Target]) -> tuple[dict[str, Target], list[str]]:
    """(file module -> target) for the modules the model has, and the names it does not have."""
    found, missing = {}, []
    for name in lora.modules:
        if name in index:
            found[name] = index[name]
        else:
            missing.append(name)
    return found, missing


def unknown_modules(lora: LoraFile) -> dict[str, list[str]]:
    """The tensors of no known format by the module they belong to: a module of the file (which then has
    parts latentforge cannot apply) or, for the others, the name before the tensor's part (kohya names hold
    no dot; others end in ``.<part>``)."""
    out: dict[str, list[str]] = {}
    for key in lora.unknown:
        dots = [i for i, c in enumerate(key) if c == "."]
        owner = next((key[:i] for i in reversed(dots) if key[:i] in lora.modules), None)
        if owner is None:
            owner = key.split(".", 1)[0] if key.startswith(("lora_", "lycoris_", "oft_")) else key.rpartition(".")[0]
        out.setdefault(owner or key, []).append(key)
    return out


def _usable(lora: LoraFile, index: dict, family: str) -> tuple[dict[str, Target], list[str]]:
    """The modules to apply and the names of those left out, with the file refused (LoraError) when fewer
    than half of its modules can be applied."""
    found, missing = match(lora, index)
    odd = unknown_modules(lora)
    found = {n: t for n, t in found.items() if n not in odd}
    left = [*missing, *(n for n in odd if n not in missing)]
    total = len(found) + len(left)
    if left and (not found or 2 * len(found) < total):
        raise LoraError(_mismatch_message(lora, found, missing, odd, index, family, total))
    if left:
        log.warning(
            "%s: %d of %d modules were not applied (%s); %d were (A1111 also applies the modules it finds)",
            lora.path,
            len(left),
            total,
            _examples(missing, odd, index, lora.modules),
            len(found),
        )
    return found, left


def _examples(missing: list[str], odd: dict[str, list[str]], index: dict, modules: dict) -> str:
    examples = []
    for name in missing[:3]:
        close = difflib.get_close_matches(name, index.keys(), n=1, cutoff=0.8)
        kind = module_kind(modules[name]) if name in modules else "lora"  # say which parts an IA3/OFT/GLoRA has
        what = f" ({WEIGHT_KINDS[kind]}: {', '.join(sorted(modules[name]))})" if kind in WEIGHT_KINDS else ""
        examples.append("no " + name + what + (f" (closest in the model: {close[0]})" if close else ""))
    tensors = [t for ts in odd.values() for t in ts]
    if tensors:
        examples.append(
            f"tensors of no known LoRA/LyCORIS format: {', '.join(short(t) for t in tensors[:3])}"
            + (" ..." if len(tensors) > 3 else "")
        )
    return "; ".join(examples)


def _mismatch_message(lora, found: dict, missing: list[str], odd: dict, index: dict, family: str, total: int) -> str:
    guess = guess_family(lora)
    hint = f" The file looks like a LoRA for {guess}." if guess and guess != family and missing else ""
    if missing:
        what, use = f"match this {family} model", f" Use a LoRA made for {family};"
    else:
        what, use = "are of a kind latentforge can apply", " its other tensors are of no LoRA/LyCORIS format;"
    return (
        f"{lora.path}: only {len(found)} of {total} LoRA modules {what}, e.g. "
        f"{_examples(missing, odd, index, lora.modules)}."
        f"{hint}{use} nothing was applied."
    )


def _does_not_fit(path: Path, name: str, where: str, why: str) -> LoraError:
    return LoraError(
        f"{path}: module {name} does not fit {where} ({why}); the file is for another model; nothing was applied"
    )


def _change_shape(parts: dict[str, Tensor], full: tuple[int, ...], dyn: int | None) -> tuple[int, ...]:
    """The shape of the weight change, checked on the meta device: ``full``, or for a 9-channel conv_in
    (inpainting) the 4 channels of an ordinary model's conv_in. Raises what the factors raise."""
    meta = {k: v if k in SCALAR_PARTS else v.to("meta") for k, v in parts.items()}
    shapes = [full]
    if len(full) == 4 and full[1] == 9:
        shapes.append((full[0], 4, *full[2:]))
    for i, shape in enumerate(shapes):
        try:
            d = delta(meta, shape, dyn)
        except RuntimeError:
            if i + 1 == len(shapes):
                raise
            continue
        for part in DORA_PARTS:
            if part in meta:
                weight = torch.empty(shape, device="meta")
                d = dora(weight, weight + d, meta[part], 1.0, per_output=part == "magnitude")
        return tuple(d.shape)
    raise AssertionError("unreachable")


def _check_weight_kind(path: Path, name: str, parts, target: Target, full: tuple[int, ...], where: str) -> None:
    """Refuse (LoraError) an IA3/OFT/GLoRA module that cannot be applied as A1111 applies it: on a fused
    q/k/v projection, on a 9-channel (inpainting) conv_in, or with parts that do not fit the weight (checked
    on the meta device, DoRA included)."""
    label = WEIGHT_KINDS[module_kind(parts)]
    if len(target) > 1:
        raise LoraError(
            f"{path}: module {name} is {label} on a fused q/k/v projection ({where} x {len(target)}); A1111 "
            f"applies {label} only to a layer's own weight, so latentforge does not support it; nothing was applied"
        )
    if len(full) == 4 and full[1] == 9:
        raise LoraError(
            f"{path}: module {name} is {label} on an inpainting model's 9-channel conv_in ({where}), which A1111 "
            "cannot apply either (it pads every conv_in change from 4 channels); not supported; nothing was applied"
        )
    meta = {k: v if k in SCALAR_PARTS else v.to("meta") for k, v in parts.items()}
    weight = torch.empty(full, device="meta")
    try:
        d = weight_change(meta, weight)
        for part in DORA_PARTS:
            if part in meta:
                dora(weight, weight + d, meta[part], 1.0, per_output=part == "magnitude")
    except (LoraError, RuntimeError, IndexError, ValueError) as e:  # our messages hold only shapes
        why = str(e) if isinstance(e, LoraError) else short(str(e), 300)
        raise LoraError(f"{path}: module {name} ({label}) does not fit {where}: {why}; nothing was applied") from None


def _module_patches(path: Path, name: str, parts, target: Target, nets, strength: float, dyn: int | None) -> dict:
    """The patcher's patches ({"<network>.<param>": fn}) of one file module on its layer (or q/k/v thirds)."""
    net, param = target[0][0], target[0][1]
    weight_shape = tuple(nets[net].get_parameter(param).shape)
    full = (weight_shape[0] * len(target), *weight_shape[1:])
    where = f"{net}.{param} {list(weight_shape)}"
    if module_kind(parts) in WEIGHT_KINDS:
        _check_weight_kind(path, name, parts, target, full, where)
        return {f"{network}.{p}": weight_patch(parts, full, None, strength) for network, p, _ in target}
    try:
        shape = _change_shape(parts, full, dyn)
    except (RuntimeError, LoraError, IndexError, KeyError, ValueError) as e:  # factors of the wrong rank or kind
        raise _does_not_fit(
            path, name, where, f"it has no {e.args[0]!r} factor" if isinstance(e, KeyError) else short(str(e), 200)
        ) from None
    dora_parts = [p for p in DORA_PARTS if p in parts]
    if dora_parts and len(target) > 1:
        raise LoraError(f"{path}: module {name} is DoRA on a fused q/k/v projection, which is not supported")
    padded = shape != full and len(full) == 4 and full[1] == 9 and shape == (full[0], 4, *full[2:])
    if dora_parts and padded:
        raise LoraError(
            f"{path}: module {name} is DoRA on an inpainting model's 9-channel conv_in, which is not supported"
        )
    if shape != full and not padded:
        raise LoraError(
            f"{path}: module {name} gives a {list(shape)} change for {where}; the file is for another model; "
            "nothing was applied"
        )
    patches = {f"{network}.{p}": weight_patch(parts, shape, third, strength, dyn) for network, p, third in target}
    bias = bias_delta(parts)
    if bias is not None:
        bias_name = param.removesuffix("weight") + "bias"
        try:
            layer_bias = nets[net].get_parameter(bias_name)
        except AttributeError:
            raise LoraError(
                f"{path}: module {name} changes the bias ({BIAS_PARTS[module_kind(parts)]}) of "
                f"{net}.{param.removesuffix('.weight')}, which has none; nothing was applied"
            ) from None
        if bias.numel() != layer_bias.numel() * len(target):
            raise _does_not_fit(
                path, name, f"{net}.{bias_name} {list(layer_bias.shape)}", f"a bias change of {bias.numel()} values"
            )
        for network, p, third in target:
            patches[f"{network}.{p.removesuffix('weight')}bias"] = bias_patch(bias, third, strength)
    elif "diff_b" in parts:
        log.info("%s: module %s: diff_b ignored next to %s factors, as A1111 does", path, name, module_kind(parts))
    return patches


def apply_lora(
    pipe,
    path: str | Path,
    *,
    strength: float = 1.0,
    text_strength: float | None = None,
    source: str | None = None,
    dyn: int | None = None,
) -> AppliedLora:
    """Merge a LoRA/LyCORIS file into ``pipe``'s UNet (``strength``) and text encoders (``text_strength``,
    default ``strength``) through ``pipe.patcher`` under ``source`` (default ``lora:<file stem>``); an
    earlier application under the same source is replaced. ``dyn``: A1111's ``dyn`` (the first ranks of each
    LoRA/LoCon module). Undo with ``pipe.patcher.remove(source)``."""
    path = Path(path)
    lora = read_lora(path)
    text_strength = strength if text_strength is None else text_strength
    nets = pipe.networks()
    index = model_index(nets, pipe.unet.config.num_res_blocks)
    found, skipped = _usable(lora, index, pipe.family.name) if lora.modules or lora.unknown else ({}, [])
    patches: dict[str, object] = {}
    counts = {"unet": 0, "text": 0}
    for name, target in found.items():
        net = target[0][0]
        s = strength if net == "unet" else text_strength
        counts["unet" if net == "unet" else "text"] += 1
        if s != 0:
            patches.update(_module_patches(path, name, lora.modules[name], target, nets, s, dyn))
    source = source or f"lora:{path.stem}"
    pipe.patcher.remove(source)
    pipe.patcher.patch(source, patches)
    digest = addnet_hash(path)
    applied = AppliedLora(source, path, counts["unet"], counts["text"], digest, skipped, lora.bundled)
    pipe.patcher.describe(source, AdapterRecord("lora", path.resolve(), strength, text_strength, digest[:12]))
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
    if any(n.startswith(("lora_unet_input_blocks", "oft_unet_input_blocks")) for n in names):
        return "sdxl-base"
    return None
