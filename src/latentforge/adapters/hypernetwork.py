"""A1111 hypernetworks: small MLPs that transform the context the UNet's attention layers read keys and
values from (NovelAI's hypernetworks, as A1111 trains and stores them).

A file (``.pt``, read with ``torch.load(weights_only=True)``, or ``.safetensors``) maps context widths
(integers: 768 for SD1's text, 320/640/1280 for self-attention inputs, ...) to a pair of modules, one for
keys and one for values, plus settings: ``layer_structure`` (widths as multiples of the context width,
default [1, 2, 1]), ``activation_func``, ``is_layer_norm``, ``activate_output``. Each module is a chain
of Linear layers, each followed by the activation (not after the last unless ``activate_output``) and
a LayerNorm when ``is_layer_norm``; dropout does nothing at inference. A module computes
``x + strength * mlp(x)``. Every attention layer whose context has a width the file covers gets its
keys' and values' context through it (A1111 applies it to self- and cross-attention alike); several
hypernetworks chain in the order given. Applied through the pipeline's ``ModelPatcher`` context hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from latentforge.io.components import require_finite
from latentforge.io.tensorfile import CheckpointError, load_pickle, short

ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": F.relu,
    "leakyrelu": F.leaky_relu,
    "elu": F.elu,
    "swish": F.hardswish,  # A1111 maps "swish" to torch's Hardswish
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softsign": F.softsign,
    "mish": F.mish,
    "gelu": F.gelu,
    "silu": F.silu,
    "selu": F.selu,
    "celu": F.celu,
    "softplus": F.softplus,
}


@dataclass
class HyperModule:
    """One key or value module: Linear layers (weight, bias) and optional LayerNorms, in order."""

    linears: list[tuple[Tensor, Tensor]]
    norms: list[tuple[Tensor, Tensor] | None]
    activation: str
    activate_output: bool

    def __call__(self, x: Tensor, strength: float) -> Tensor:
        y = x.float()
        act = ACTIVATIONS[self.activation]
        for i, ((w, b), norm) in enumerate(zip(self.linears, self.norms)):
            y = F.linear(y, w.to(y.device), b.to(y.device))
            if i < len(self.linears) - 1 or self.activate_output:
                y = act(y)
            if norm is not None:
                y = F.layer_norm(y, (y.shape[-1],), norm[0].to(y.device), norm[1].to(y.device))
        return (x.float() + y * strength).to(x.dtype)


@dataclass
class Hypernetwork:
    name: str
    layers: dict[int, tuple[HyperModule, HyperModule]]  # context width -> (keys, values)


def _module(sd: dict, width: int, settings: dict, where: str) -> HyperModule:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where}: expected a state dict for width {width}, found {type(sd).__name__}")
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(
            f"{where}: the module for width {width} has a key {short(bad_keys[0])} that is not a name"
        )
    # the old layout: linear1/linear2
    sd = {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v for k, v in sd.items()}
    indices = set()
    for k in sd:
        if k.startswith("linear.") and k.endswith(".weight"):
            index = k[len("linear.") : -len(".weight")]
            if not index.isdecimal() or len(index) > 4:
                raise CheckpointError(f"{where}: the module for width {width} has a layer named {short(k)}")
            indices.add(int(index))
    linears, norms = [], []
    for i in sorted(indices):
        w, b = sd.get(f"linear.{i}.weight"), sd.get(f"linear.{i}.bias")
        if not isinstance(w, Tensor) or not isinstance(b, Tensor):
            raise CheckpointError(f"{where}: layer linear.{i} of width {width} lacks a weight or bias tensor")
        if not w.is_floating_point() or not b.is_floating_point():
            raise CheckpointError(f"{where}: layer linear.{i} of width {width} is not stored as floating point")
        for t in (w, b):
            require_finite(t, f"{where}: layer linear.{i} of width {width}")
        if w.ndim == 2 and tuple(b.shape) == (w.shape[0],):
            linears.append((w.float(), b.float()))
            norms.append(None)
        elif w.ndim == 1 and linears and tuple(b.shape) == tuple(w.shape) == (linears[-1][0].shape[0],):
            norms[-1] = (w.float(), b.float())
        else:
            raise CheckpointError(
                f"{where}: layer linear.{i} of width {width} has unexpected shapes: weight {tuple(w.shape)}, "
                f"bias {tuple(b.shape)}"
            )
    if not linears:
        raise CheckpointError(f"{where}: no linear layers for width {width}")
    dims = [width] + [w.shape[0] for w, _ in linears]
    for (w, _), n_in in zip(linears, dims):
        if w.shape[1] != n_in:
            raise CheckpointError(f"{where}: the layers for width {width} do not chain ({tuple(w.shape)} after {n_in})")
    if dims[-1] != width:
        raise CheckpointError(f"{where}: the layers for width {width} end at width {dims[-1]}")
    activation = str(settings.get("activation_func") or "linear").lower()
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{where}: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return HyperModule(linears, norms, activation, bool(settings.get("activate_output", True)))


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """A hypernetwork file -> its modules per context width (clear errors naming the file otherwise)."""
    path = Path(path)
    where = str(path)
    try:
        if path.suffix.lower() == ".safetensors":
            raise CheckpointError(f"{where}: hypernetworks are A1111 .pt files; a .safetensors file is not one")
        data = load_pickle(path)  # weights_only, after the checks every pickle gets
    except CheckpointError as e:
        raise CheckpointError(f"{where} is not a readable hypernetwork file: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} is not an A1111 hypernetwork (no dictionary of layers)")
    layers = {}
    for width, pair in data.items():
        if type(width) is not int:  # settings have names; bool is no width
            continue
        if not 1 <= width <= 16384 or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise CheckpointError(f"{where}: width {width} must hold a (keys, values) pair of modules")
        layers[width] = (_module(pair[0], width, data, where), _module(pair[1], width, data, where))
    if not layers:
        raise CheckpointError(f"{where} holds no hypernetwork layers (no integer context widths)")
    return Hypernetwork(str(data.get("name") or path.stem), layers)


def apply_hypernetwork(pipe, path: str | Path, *, strength: float = 1.0, source: str | None = None) -> str:
    """Install a hypernetwork on every attention layer of ``pipe``'s UNet whose context width it covers;
    returns the patcher source (``pipe.patcher.remove(source)`` takes it back)."""
    net = read_hypernetwork(path)
    source = source or f"hypernet:{Path(path).stem}"

    def hook(module, k_ctx: Tensor, v_ctx: Tensor) -> tuple[Tensor, Tensor]:
        pair = net.layers.get(k_ctx.shape[-1])
        if pair is None:
            return k_ctx, v_ctx
        return pair[0](k_ctx, strength), pair[1](v_ctx, strength)

    count = pipe.patcher.add_context_hook(source, hook, lambda name, module: True)
    if count == 0:
        pipe.patcher.remove(source)
        raise CheckpointError(f"{path}: this model has no attention layers for a hypernetwork")
    from latentforge.adapters.lora import AdapterRecord
    from latentforge.io.hashing import sha256_of

    path = Path(path).resolve()
    pipe.patcher.describe(source, AdapterRecord("hypernet", path, strength, None, sha256_of(path)[:12]))
    return source
