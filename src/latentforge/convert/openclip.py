"""OpenCLIP text-encoder names (SD2, SDXL bigG single files) <-> Hugging Face CLIP names.

The fused attention input projection ``attn.in_proj_weight`` [3W, W] is split into q, k, v in thirds;
``text_projection`` [W, P] is the transpose of the Hugging Face ``text_projection.weight`` [P, W].
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
# OpenCLIP keys with no place in the text transformer; kept aside, never silently dropped
UNUSED = ("logit_scale", "attn_mask")


def to_hf(key: str) -> list[tuple[str, int | None]]:
    """OpenCLIP key -> [(Hugging Face key, third of the fused in_proj or None)]; [] for ``UNUSED`` keys."""
    if key in _TOP:
        return [(_TOP[key], None)]
    if key in UNUSED:
        return []
    if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
        i, param = m.groups()
        return [(f"encoder.layers.{i}.self_attn.{p}_proj.{param}", n) for n, p in enumerate("qkv")]
    if m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
        i, module, param = m.groups()
        if module in _LAYER:
            return [(f"encoder.layers.{i}.{_LAYER[module]}.{param}", None)]
    raise KeyError(f"unknown OpenCLIP text key {key!r}")


def transform(key: str, tensor: Tensor, third: int | None) -> Tensor:
    """Turn an OpenCLIP tensor into the Hugging Face tensor ``to_hf`` named."""
    if third is not None:
        w = tensor.shape[0] // 3
        return tensor[third * w : (third + 1) * w].clone()
    if key == "text_projection":
        return tensor.t().contiguous()
    return tensor


def from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face text-encoder state dict -> OpenCLIP names (q, k, v fused again)."""
    inv_top = {v: k for k, v in _TOP.items()}
    inv_layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        if key in inv_top:
            out[inv_top[key]] = t.t().contiguous() if key == "text_projection.weight" else t
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise KeyError(f"no OpenCLIP name for text key {key!r}")
        i, module, param = m.groups()
        if qkv := re.match(r"self_attn\.([qkv])_proj$", module):
            fused.setdefault(f"transformer.resblocks.{i}.attn.in_proj_{param}", {})[qkv.group(1)] = t
        else:
            out[f"transformer.resblocks.{i}.{inv_layer[module]}.{param}"] = t
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
