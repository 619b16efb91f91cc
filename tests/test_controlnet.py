"""ControlNet (Zhang et al. 2023): our network and loaders against diffusers' ControlNetModel on tiny
random-weight models, the unit rules (weight, guidance range, soft weights) from their definitions."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from latentforge.adapters.controlnet import ControlNetError, load_controlnet, round_trip_ok
from latentforge.convert.diffusers import unet_config_from_diffusers
from tiny import build_reference, close, perturb


@pytest.fixture(scope="module")
def reference():
    ref = build_reference("sd1")
    net = perturb(ControlNetModel.from_unet(ref.unet), 7)
    return ref, net


def _original_layout(net: ControlNetModel, levels: int, n: int) -> dict[str, torch.Tensor]:
    """The original ``control_model.*`` names written from the layout's description (test-only)."""
    out = {}
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    hint_blocks = len(net.controlnet_cond_embedding.blocks)
    for k, v in net.state_dict().items():
        name = k
        if k.startswith("time_embedding.linear_"):
            name = "time_embed." + ("0" if "linear_1" in k else "2") + k[len("time_embedding.linear_1") :]
        elif k.startswith("conv_in."):
            name = "input_blocks.0.0." + k[len("conv_in.") :]
        elif k.startswith("controlnet_cond_embedding.conv_in."):
            name = "input_hint_block.0." + k.rsplit(".", 1)[1]
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            name = f"input_hint_block.{2 * (hint_blocks + 1)}." + k.rsplit(".", 1)[1]
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)$", k):
            name = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(\w+)$", k):
            name = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        elif m := re.match(r"controlnet_mid_block\.(\w+)$", k):
            name = f"middle_block_out.0.{m.group(1)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(\w+)\.(.+)$", k):
            level, kind, j, first, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), m.group(5)
            block = 1 + level * (n + 1) + (n if kind == "downsamplers" else j)
            if kind == "downsamplers":
                name = f"input_blocks.{block}.0.op.{rest}"
            elif kind == "resnets":
                name = f"input_blocks.{block}.0.{resnet[first]}.{rest}"
            else:
                name = f"input_blocks.{block}.1.{first}.{rest}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(\w+)\.(.+)$", k):
            kind, j, first, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            if kind == "attentions":
                name = f"middle_block.1.{first}.{rest}"
            else:
                name = f"middle_block.{2 * j}.{resnet[first]}.{rest}"
        else:
            raise AssertionError(f"test converter has no rule for {k}")
        out["control_model." + name] = v.contiguous()
    return out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([500.0, 123.0])
    return x, t, ctx, hint


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_residuals_equal_diffusers(reference, tmp_path, layout):
    ref, net = reference
    target = unet_config_from_diffusers(dict(ref.unet.config))
    path = tmp_path / "cn.safetensors"
    if layout == "diffusers":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        save_file(_original_layout(net, 4, 2), str(path))
    ours = load_controlnet(path, target)
    assert round_trip_ok(ours)
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        down, mid = net(x, t, ctx, hint, return_dict=False)
        res = ours(x, t, ctx, hint)
    assert len(res.output) == len(down) == 12
    for a, b in zip(res.output, down):
        ok, diff, scale = close(a, b)
        assert ok, (diff, scale)
    ok, diff, scale = close(res.middle, mid)
    assert ok, (diff, scale)
