"""Test helper: read ncnn models (the .param text and .bin weights) and name their weights as BasicSR does.

The ncnn formats, from ncnn's documentation ("param and model file structure"):
- .param: a magic line ``7767517``; ``layer_count blob_count``; then one line per layer:
  ``type name input_count output_count inputs... outputs... key=value...``. A key <= -23300 holds an
  array of id ``-key - 23300`` written ``count,v1,v2,...``.
- .bin: the weights of the layers in .param order, each blob back to back. Convolution: its weight
  (``num_output * in * kh * kw`` values, key 6 = weight_data_size) preceded by a 4-byte tag (0 = raw
  float32, 0x01306B47 = float16, padded to 4 bytes), then, with bias_term (key 5), ``num_output`` raw
  float32 biases. PReLU: ``num_slope`` (key 0) raw float32 slopes. The other layers used by these
  models (Input, Split, Concat, Eltwise, BinaryOp, Interp, PixelShuffle) carry no weights.

Layers come in execution order, which for these exported networks is the order of the PyTorch modules:
the convolutions (and PReLUs) are matched to BasicSR's module names in that order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FP16_TAG = 0x01306B47


@dataclass
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object]


def parse_param(path: Path) -> list[Layer]:
    lines = path.read_text().split("\n")
    assert lines[0].strip() == "7767517", f"{path}: not an ncnn .param file"
    count = int(lines[1].split()[0])
    layers = []
    for line in lines[2 : 2 + count]:
        parts = line.split()
        n_in, n_out = int(parts[2]), int(parts[3])
        inputs, outputs = parts[4 : 4 + n_in], parts[4 + n_in : 4 + n_in + n_out]
        params: dict[int, object] = {}
        for item in parts[4 + n_in + n_out :]:
            key, value = item.split("=")
            k = int(key)
            if k <= -23300:
                values = value.split(",")[1:]
                params[-k - 23300] = [float(v) for v in values]
            else:
                params[k] = float(value) if any(c in value for c in ".e") else int(value)
        layers.append(Layer(parts[0], parts[1], inputs, outputs, params))
    return layers


def read_weights(param: Path, binary: Path) -> list[tuple[Layer, dict[str, torch.Tensor]]]:
    """Each weighted layer with its tensors: Convolution -> weight (out, in, k, k), bias; PReLU -> slope."""
    data = binary.read_bytes()
    pos = 0

    def raw(n: int) -> np.ndarray:
        nonlocal pos
        out = np.frombuffer(data, "<f4", n, pos)
        pos += 4 * n
        return out

    result = []
    for layer in parse_param(param):
        if layer.type == "Convolution":
            n = layer.params[6]
            (tag,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if tag == FP16_TAG:
                w = np.frombuffer(data, "<f2", n, pos).astype(np.float32)
                pos += (2 * n + 3) // 4 * 4
            elif tag == 0:
                w = raw(n)
            else:
                raise ValueError(f"{binary}: {layer.name} has weight tag {tag:#x} (quantised), not supported here")
            out_ch, k = layer.params[0], layer.params[1]
            weight = torch.from_numpy(w.copy()).reshape(out_ch, -1, k, k)
            tensors = {"weight": weight}
            if layer.params.get(5, 0):
                tensors["bias"] = torch.from_numpy(raw(out_ch).copy())
            result.append((layer, tensors))
        elif layer.type == "PReLU":
            result.append((layer, {"weight": torch.from_numpy(raw(layer.params[0]).copy())}))
        elif layer.type in ("MemoryData", "InnerProduct", "BatchNorm", "Scale", "Deconvolution"):
            raise ValueError(f"{param}: layer type {layer.type} carries weights this helper does not read")
    assert pos == len(data), f"{binary}: read {pos} of {len(data)} bytes; the layout was not understood"
    return result


def rrdbnet_names(blocks: int, upsamples: int = 2) -> list[str]:
    """BasicSR's RRDBNet convolutions in execution order."""
    names = ["conv_first"]
    names += [f"body.{i}.rdb{j}.conv{k}" for i in range(blocks) for j in (1, 2, 3) for k in range(1, 6)]
    names += ["conv_body", *(f"conv_up{i + 1}" for i in range(upsamples)), "conv_hr", "conv_last"]
    return names


def to_state_dict(param: Path, binary: Path) -> dict[str, torch.Tensor]:
    """BasicSR-named state dict of an ncnn RRDBNet (Real-ESRGAN x4plus, x4plus-anime) or SRVGGNetCompact
    (realesr-animevideov3) model."""
    weighted = read_weights(param, binary)
    sd: dict[str, torch.Tensor] = {}
    if any(layer.type == "PReLU" for layer, _ in weighted):  # compact: conv, prelu, ..., conv = body.0 ...
        for i, (_, tensors) in enumerate(weighted):
            sd.update({f"body.{i}.{k}": v for k, v in tensors.items()})
        return sd
    convs = len(weighted)
    blocks = (convs - 6) // 15  # first, trunk, 2 up, hr, last + 15 per RRDB
    names = rrdbnet_names(blocks)
    assert len(names) == convs, f"{param}: {convs} convolutions do not make an x4 RRDBNet"
    for name, (_, tensors) in zip(names, weighted):
        sd.update({f"{name}.{k}": v for k, v in tensors.items()})
    return sd
