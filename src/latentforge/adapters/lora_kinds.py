"""The math of each LoRA/LyCORIS module kind, as A1111 1.10's extensions-builtin/Lora computes it.

- LoRA (Hu et al. 2021, kohya / diffusers / PEFT files): delta = up @ down * alpha / rank, alpha missing
  means alpha = rank; LoCon applies the same to convolutions (down a k x k conv, up a 1x1 conv) and its
  Tucker form adds ``lora_mid`` (delta[p, r, k, l] = sum up[p, i] mid[i, j, k, l] down[j, r]). ``dyn``
  (A1111's ``<lora:name:te:unet:dyn>``) keeps the first ``dyn`` columns of up and rows of down, the scale
  staying alpha / the file's rank (``lyco_helpers.rebuild_conventional``; not for the Tucker form).
- LoHa (LyCORIS, Hadamard product): delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, rank = w1b rows;
  with ``hada_t1``/``hada_t2`` each factor is the Tucker product t x_0 w_a x_1 w_b.
- LoKr (LyCORIS, Kronecker product): delta = kron(w1, w2) with each factor given whole or as a low-rank
  a @ b (``lokr_t2``: Tucker); the alpha / rank scale applies only when a factor is low-rank, else 1.
- LyCORIS full (``diff``, ``network_full``): a whole weight difference, and ``diff_b`` the bias's.
- LyCORIS norm (``w_norm``/``b_norm``, ``network_norm``): differences of a GroupNorm/LayerNorm's weight
  and bias.
- DoRA (Liu et al. 2024): with ``dora_scale`` (kohya, LyCORIS), A1111's ``apply_weight_decompose``:
  merged = W + delta, merged * (dora_scale / norm) with the norm always taken per *input* channel ([1, in,
  1, 1]), whatever dora_scale's shape: an [out, 1] scale (LyCORIS ``wd_on_out``) broadcasts against it, as
  in A1111. PEFT's ``lora_magnitude_vector`` (part ``magnitude``, [out]), which A1111 cannot read, is the
  DoRA paper's per-output-row norm. A strength s gives W + s * (DoRA(W) - W).

Only the multiplier scales bias and norm changes (A1111's ``calc_scale`` is 1 for modules without a rank).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LoraError(ValueError):
    """An adapter file does not fit the model or cannot be read; the message names the file."""


# the parts of a module that change a bias (the layer's ``.bias``), by the module kind that uses them; A1111
# ignores a ``diff_b`` next to LoRA/LoHa/LoKr factors (only network_full reads it)
BIAS_PARTS = {"diff": "diff_b", "norm": "b_norm"}
DORA_PARTS = ("dora_scale", "magnitude")


def module_kind(parts: dict[str, Tensor]) -> str:
    if "up" in parts:
        return "dora" if any(p in parts for p in DORA_PARTS) else ("locon-tucker" if "mid" in parts else "lora")
    if "hada_w1_a" in parts:
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if "diff" in parts:
        return "diff"
    if "w_norm" in parts:
        return "norm"
    return "unknown"


def _tucker(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    # t (r1, r2, k, l) contracted with a (r1, out) and b (r2, in) -> (out, in, k, l)
    return torch.einsum("ijkl,ip,jr->prkl", t, a, b)


def _alpha_scale(parts: dict[str, Tensor], rank: int) -> float:
    alpha = parts.get("alpha")
    if alpha is not None and rank <= 0:  # read_lora refuses empty factors; this is for other callers
        raise LoraError(f"a factor has rank {rank}; alpha / rank is undefined")
    return 1.0 if alpha is None else float(alpha) / rank


def delta(parts: dict[str, Tensor], shape: torch.Size | tuple[int, ...], dyn: int | None = None) -> Tensor:
    """The weight difference a module's factors describe (float32, reshaped to ``shape``), without DoRA
    and without the user's strength; ``dyn`` keeps the first ranks of a plain LoRA/LoCon. Works on the meta
    device too (to check shapes)."""
    if "up" in parts:
        up, down = parts["up"].flatten(1), parts["down"]
        rank = down.shape[0]
        if "mid" in parts:
            d = torch.einsum("ijkl,jr,pi->prkl", parts["mid"], down.flatten(1), up)
        elif dyn is not None:
            d = up[:, :dyn] @ down.flatten(1)[:dyn]
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
    if "w_norm" in parts:
        return parts["w_norm"].reshape(shape)
    raise LoraError(f"module with parts {sorted(parts)} is no LoRA, LoHa, LoKr, diff or norm module")


def bias_delta(parts: dict[str, Tensor]) -> Tensor | None:
    """The bias difference of a full (``diff_b``) or norm (``b_norm``) module, flat; None for other kinds."""
    part = BIAS_PARTS.get(module_kind(parts))
    return None if part is None or part not in parts else parts[part].reshape(-1)


def dora(weight: Tensor, merged: Tensor, scale: Tensor, strength: float, *, per_output: bool = False) -> Tensor:
    """DoRA: ``merged`` (W + delta) times ``scale`` / its norm, per input channel as A1111's
    ``apply_weight_decompose`` (``scale`` broadcast as it is, so an [out, 1] scale gives an [out, in] factor),
    or per output row with ``per_output`` (PEFT's magnitude vector); the strength interpolates from W."""
    if per_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        scaled = merged * (scale.reshape(-1) / norm).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = (
            merged.transpose(0, 1)
            .reshape(merged.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1))
            .transpose(0, 1)
        )
        scaled = merged * (scale / norm)
    return weight + strength * (scaled - weight)


def weight_patch(
    parts: dict[str, Tensor], shape: tuple[int, ...], third: int | None, strength: float, dyn: int | None = None
):
    """fn(weight float32) -> weight with the module's change: ``shape`` is the change's full shape (a fused
    q/k/v delta before its ``third`` is cut out; 4 input channels for an inpainting conv_in of 9, which A1111
    zero-pads)."""

    def fn(weight: Tensor) -> Tensor:
        on = {k: v if k == "alpha" else v.to(weight.device) for k, v in parts.items()}
        d = delta(on, shape, dyn)
        if third is not None:
            rows = shape[0] // 3
            d = d[third * rows : (third + 1) * rows]
        if d.dim() == 4 and d.shape[1] < weight.shape[1]:  # inpainting: no change for the extra channels
            d = torch.nn.functional.pad(d, (0, 0, 0, 0, 0, weight.shape[1] - d.shape[1]))
        for part in DORA_PARTS:
            if part in on:
                return dora(weight, weight + d, on[part], strength, per_output=part == "magnitude")
        return weight + strength * d

    return fn


def bias_patch(change: Tensor, third: int | None, strength: float):
    """fn(bias float32) -> bias + strength * change (its ``third`` for a fused q/k/v projection)."""

    def fn(bias: Tensor) -> Tensor:
        d = change.to(bias.device)
        if third is not None:
            rows = d.shape[0] // 3
            d = d[third * rows : (third + 1) * rows]
        return bias + strength * d

    return fn
