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

The last kinds change a layer as a function of its weight W (``weight_change``; A1111 hands W to their
``calc_updown``), with no alpha / rank scale (``calc_scale`` is 1: no rank; OFT sets its scale to 1):

- IA3 (LyCORIS, ``network_ia3``): part ``weight`` (a per-channel scale w) and ``on_input``; delta = W * w,
  w taken as an [n, 1] column (scaling output rows) unless ``on_input`` is true (then broadcast as stored,
  scaling input columns). A1111 reads ``on_input`` always; a file without it is taken as on_input = 0,
  LyCORIS's default. An output scale does not broadcast against a convolution's [out, in, k, k] weight
  (A1111 fails on it), so that is refused.
- OFT (``network_oft``): kohya's ``oft_blocks`` [n, b, b] with ``alpha`` the constraint, and LyCORIS's
  ``oft_blocks`` alike: n = the blocks' count, b = out / n; Q = blocks - blocksᵀ, scaled to Frobenius norm
  at most alpha * out (both norms + 1e-8; no scaling when alpha is 0 or missing); each block's rotation
  R = (I + Q)(I - Q)⁻¹ (Cayley). Old LyCORIS ``oft_diag`` [n, b, b] is R itself (b = its second size,
  n = out / b). The output channels of W, in n consecutive blocks of b, become Rᵀ @ block (A1111's einsum
  ``k n m, k n ... -> k m ...``; convolutions alike, over [b, in * k * k]); delta = merged - W.
- BOFT (LyCORIS, ``network_oft``, 4-d ``oft_blocks`` [m, n, b, b]): the same Cayley rotations (norm
  constraint over all m stages); stage i regroups the output channels by pairs of 2^i * (b // 2)
  ((c g k) -> (c k g), g = 2), multiplies each of the n blocks of b by R_i (not transposed), and undoes
  the regrouping. A ``rescale`` part multiplies the merged weight's output rows, for OFT and BOFT.
- GLoRA (LyCORIS, ``network_glora``): parts ``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``;
  delta = b2 @ b1 + W @ a2 @ a1 (Linear layers only: A1111's matrix products fail on a convolution's
  4-d weight); A1111 requires an ``alpha`` but does not use it (no rank, so no alpha / rank scale).

A strength s gives W + s * delta for all of them (``finalize_updown``'s multiplier). On a fused q/k/v
projection (one file module for three of our weights) and on an inpainting model's 9-channel conv_in
(whose change A1111 pads from 4 channels, which fails for a change computed from the 9-channel weight)
``adapters.lora`` refuses these kinds.

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
SCALAR_PARTS = ("alpha", "on_input")  # one number each, read on the CPU
GLORA_PARTS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
# the kinds whose change is a function of the layer's weight (``weight_change``), with their names
WEIGHT_KINDS = {"ia3": "IA3", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA"}


def module_kind(parts: dict[str, Tensor]) -> str:
    """The module's kind, tried in A1111's order (networks.module_types: LoRA, LoHa, IA3, LoKr, full, norm,
    GLoRA, OFT)."""
    if "up" in parts:
        return "dora" if any(p in parts for p in DORA_PARTS) else ("locon-tucker" if "mid" in parts else "lora")
    if "hada_w1_a" in parts:
        return "loha"
    if "weight" in parts:
        return "ia3"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if "diff" in parts:
        return "diff"
    if "w_norm" in parts:
        return "norm"
    if any(p in parts for p in GLORA_PARTS):
        return "glora"
    if "oft_blocks" in parts:
        return "boft" if parts["oft_blocks"].dim() == 4 else "oft"
    if "oft_diag" in parts:
        return "oft"
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
    kind = module_kind(parts)
    if kind in WEIGHT_KINDS:
        raise LoraError(f"a {WEIGHT_KINDS[kind]} module's change depends on the layer's weight (weight_change)")
    raise LoraError(f"module with parts {sorted(parts)} is no LoRA, LoHa, LoKr, diff, norm, IA3, OFT or GLoRA module")


def bias_delta(parts: dict[str, Tensor]) -> Tensor | None:
    """The bias difference of a full (``diff_b``) or norm (``b_norm``) module, flat; None for other kinds."""
    part = BIAS_PARTS.get(module_kind(parts))
    return None if part is None or part not in parts else parts[part].reshape(-1)


def weight_change(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    """A1111's change (``calc_updown`` before the multiplier and DoRA) of an IA3, OFT, BOFT or GLoRA module
    for the layer weight ``weight`` (float32). A part that does not fit raises LoraError saying why, never a
    torch error; works on the meta device too (to check shapes), with the ``SCALAR_PARTS`` on the CPU."""
    kind = module_kind(parts)
    if kind == "ia3":
        return _ia3(parts, weight)
    if kind == "glora":
        return _glora(parts, weight)
    if kind not in ("oft", "boft"):
        raise LoraError(f"module with parts {sorted(parts)} is no IA3, OFT or GLoRA module")
    merged = _boft(parts, weight) if kind == "boft" else _oft(parts, weight)
    if "rescale" in parts:  # per output row, reshaped [-1, 1, ...] as A1111 does
        rescale = parts["rescale"].reshape(-1, *[1] * (weight.dim() - 1))
        _must_broadcast(rescale, weight, f"an OFT rescale of {parts['rescale'].numel()} values")
        merged = rescale * merged
    return merged - weight


def _must_broadcast(t: Tensor, weight: Tensor, what: str) -> None:
    try:
        fits = torch.broadcast_shapes(t.shape, weight.shape) == weight.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise LoraError(f"{what} (shape {list(t.shape)}) does not broadcast against the {list(weight.shape)} weight")


def _ia3(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    on_input = "on_input" in parts and bool(parts["on_input"].item())
    w = parts["weight"] if on_input else parts["weight"].reshape(-1, 1)
    what = "an IA3 input-channel scale" if on_input else "an IA3 output-channel scale taken as [n, 1]"
    try:
        _must_broadcast(w, weight, what)
    except LoraError as e:
        conv = not on_input and weight.dim() == 4
        raise LoraError(f"{e}{' (A1111 fails on a convolution output scale too)' if conv else ''}") from None
    return weight * w


def _glora(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    missing = [p for p in GLORA_PARTS if p not in parts]
    if missing:
        raise LoraError(f"a GLoRA module needs {', '.join(GLORA_PARTS)}; it has no {', '.join(missing)}")
    a1, a2, b1, b2 = (parts[p] for p in GLORA_PARTS)
    shapes = ", ".join(f"{p} {list(parts[p].shape)}" for p in GLORA_PARTS)
    if weight.dim() != 2:
        raise LoraError(
            f"GLoRA (b2 @ b1 + W @ a2 @ a1) applies to a Linear layer's 2-d weight, not a {list(weight.shape)} one "
            "(A1111's matrix products fail there too)"
        )
    out, inp = weight.shape
    fits = (
        all(t.dim() == 2 for t in (a1, a2, b1, b2))
        and a2.shape[0] == inp
        and a1.shape == (a2.shape[1], inp)
        and b2.shape[0] == out
        and b1.shape == (b2.shape[1], inp)
    )
    if not fits:
        raise LoraError(f"GLoRA factors {shapes} do not give b2 @ b1 + W @ a2 @ a1 of the weight's [{out}, {inp}]")
    return b2 @ b1 + (weight @ a2) @ a1


def _cayley(blocks: Tensor, parts: dict[str, Tensor], out: int) -> Tensor:
    """Rotations from (B)OFT blocks: Q = blocks - blocksᵀ with its Frobenius norm clamped to alpha * out
    (unless that is 0), then (I + Q)(I - Q)⁻¹; I - Q of a skew-symmetric Q is always invertible."""
    q = blocks - blocks.transpose(-1, -2)
    constraint = 0.0 if "alpha" not in parts else float(parts["alpha"]) * out
    if constraint != 0:
        norm = q.norm()
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    out = weight.shape[0]
    if "oft_blocks" in parts:  # kohya / LyCORIS: n blocks of out / n channels
        blocks = parts["oft_blocks"]
        num = blocks.shape[0] if blocks.dim() == 3 else 0
        if not num or out % num:
            raise LoraError(
                f"OFT blocks of shape {list(blocks.shape)} are not [blocks, size, size] with a number of blocks "
                f"that divides the layer's {out} output channels"
            )
        size = out // num
        if blocks.shape[1:] != (size, size):
            raise LoraError(
                f"OFT blocks of shape {list(blocks.shape)} are not {num} blocks of {size} x {size} for the "
                f"layer's {out} output channels"
            )
        rot = _cayley(blocks, parts, out)
    else:  # old LyCORIS: the rotations themselves, blocks of oft_diag.shape[1] channels
        rot = parts["oft_diag"]
        size = rot.shape[1] if rot.dim() == 3 else 0
        num = out // size if size else 0
        if not size or out % size or rot.shape != (num, size, size):
            raise LoraError(
                f"OFT oft_diag of shape {list(rot.shape)} is not [blocks, size, size] with blocks * size = the "
                f"layer's {out} output channels"
            )
    grouped = weight.reshape(num, size, *weight.shape[1:])
    return torch.einsum("knm,kn...->km...", rot, grouped).reshape(weight.shape)


def _boft(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    blocks = parts["oft_blocks"]  # [stages, blocks, size, size]
    stages, num, size = blocks.shape[:3]
    out, rest = weight.shape[0], weight.shape[1:]
    half = size // 2
    groups = [2**i * half for i in range(stages)]
    if blocks.shape[3] != size or num * size != out or not half or any(out % (2 * k) for k in groups):
        raise LoraError(
            f"BOFT blocks of shape {list(blocks.shape)} do not fit the layer's {out} output channels (they need "
            f"blocks * size = {out}, and pairs of 2^i * (size // 2) channels that divide it)"
        )
    rot = _cayley(blocks, parts, out)
    x = weight
    for r, k in zip(rot, groups):
        x = x.reshape(out // (2 * k), 2, k, *rest).transpose(1, 2).reshape(out, *rest)  # (c g k) -> (c k g)
        x = torch.einsum("dij,dj...->di...", r, x.reshape(num, size, *rest)).reshape(out, *rest)
        x = x.reshape(out // (2 * k), k, 2, *rest).transpose(1, 2).reshape(out, *rest)  # (c k g) -> (c g k)
    return x


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

    weighted = module_kind(parts) in WEIGHT_KINDS  # adapters.lora gives these no third and no padding

    def fn(weight: Tensor) -> Tensor:
        on = {k: v if k in SCALAR_PARTS else v.to(weight.device) for k, v in parts.items()}
        d = weight_change(on, weight) if weighted else delta(on, shape, dyn)
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
