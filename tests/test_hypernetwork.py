"""A1111 hypernetworks: the file format, the formula x + strength * mlp(x) on the keys' and values'
context, applied per request from <hypernet:name:w> tags and taken back."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentforge
from latentforge.io.tensorfile import CheckpointError
from tiny import build_reference, save_folder

WIDTH = 128  # the tiny models' text context width; their self-attention widths (32, 64) are not covered


def _module(seed: int, norm: bool) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    # A1111's Sequential for layer_structure [1, 2, 1], relu, layer norm: Linear, ReLU, LayerNorm, Linear, LayerNorm
    sd["linear.0.weight"] = torch.randn(2 * WIDTH, WIDTH, generator=g) * 0.05
    sd["linear.0.bias"] = torch.randn(2 * WIDTH, generator=g) * 0.05
    if norm:
        sd["linear.2.weight"] = 1 + torch.randn(2 * WIDTH, generator=g) * 0.1
        sd["linear.2.bias"] = torch.randn(2 * WIDTH, generator=g) * 0.1
    last = 3 if norm else 2
    sd[f"linear.{last}.weight"] = torch.randn(WIDTH, 2 * WIDTH, generator=g) * 0.05
    sd[f"linear.{last}.bias"] = torch.randn(WIDTH, generator=g) * 0.05
    if norm:
        sd["linear.4.weight"] = 1 + torch.randn(WIDTH, generator=g) * 0.1
        sd["linear.4.bias"] = torch.randn(WIDTH, generator=g) * 0.1
    return sd


def _expected(sd: OrderedDict, x: torch.Tensor, strength: float) -> torch.Tensor:
    """The A1111 module written out: Linear, ReLU, LayerNorm, Linear (no activation: activate_output off),
    LayerNorm; then x + strength * that."""
    y = F.layer_norm(F.relu(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"])), (2 * WIDTH,),
                     sd["linear.2.weight"], sd["linear.2.bias"])  # fmt: skip
    y = F.layer_norm(F.linear(y, sd["linear.3.weight"], sd["linear.3.bias"]), (WIDTH,),
                     sd["linear.4.weight"], sd["linear.4.bias"])  # fmt: skip
    return x + strength * y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hyper")
    pipe = latentforge.load(save_folder(build_reference("sd1", seed=3), root / "m"), dtype="fp32")
    module = _module(1, norm=True)
    data = {WIDTH: [module, module], "layer_structure": [1, 2, 1], "activation_func": "relu",
            "is_layer_norm": True, "activate_output": False, "use_dropout": False, "name": "style"}  # fmt: skip
    (root / "hn").mkdir()
    torch.save(data, root / "hn" / "style.pt")
    return pipe, module, root


@torch.no_grad()
def test_same_modules_for_keys_and_values_equal_a_transformed_text_context(setup):
    """With the same module for keys and values and only the text width covered, the hypernetwork is the
    plain UNet run on the transformed text context (self-attention never sees it)."""
    pipe, module, root = setup
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, WIDTH, generator=g), torch.tensor([400.0])
    plain = pipe.unet(x, t, ctx)
    expected = pipe.unet(x, t, _expected(module, ctx, 0.7))
    source = pipe.apply_hypernetwork(root / "hn" / "style.pt", strength=0.7)
    torch.testing.assert_close(pipe.unet(x, t, ctx), expected, rtol=1e-5, atol=1e-5)
    pipe.patcher.remove(source)
    assert torch.equal(pipe.unet(x, t, ctx), plain)


def test_prompt_tag_applies_for_the_request_only(setup):
    pipe, _, root = setup
    pipe.folders.hypernetworks.append(root / "hn")
    opts = dict(steps=3, seed=2, width=64, height=64)
    plain = pipe.txt2img("a cube", **opts)
    tagged = pipe.txt2img("a cube <hypernet:style:0.8>", **opts)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(tagged.images[0]))
    assert pipe.patcher.sources == []
    assert 'Hypernet hashes: "style: ' in tagged.infotexts[0] and "<hypernet:style:0.8>" in tagged.infotexts[0]
    again = pipe.txt2img("a cube", **opts)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
    # A1111's tag equals the hypernetwork applied to the pipeline, which the infotext and record name too
    from latentforge.pipelines.metadata import request_from_infotext, unreproduced_fields

    source = pipe.apply_hypernetwork(root / "hn" / "style.pt", strength=0.8)
    try:
        applied = pipe.txt2img("a cube", **opts)
    finally:
        pipe.patcher.remove(source)
    assert np.array_equal(np.asarray(applied.images[0]), np.asarray(tagged.images[0]))
    digest = tagged.infotexts[0].split('Hypernet hashes: "style: ', 1)[1][:12]
    assert f'Hypernet hashes: "style: {digest}"' in applied.infotexts[0]
    assert unreproduced_fields(request_from_infotext(applied.infotexts[0])[0]) == ["Hypernet hashes"]
    assert unreproduced_fields(request_from_infotext(tagged.infotexts[0])[0]) == []
    record = json.loads(applied.images[0].info["latentforge"])
    assert (
        record["request"]["networks"][0]["kind"] == "hypernet" and record["request"]["networks"][0]["strength"] == 0.8
    )


def test_bad_hypernetwork_files(setup, tmp_path):
    pipe, module, _ = setup
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable hypernetwork"):
        pipe.apply_hypernetwork(tmp_path / "junk.pt")
    torch.save({"name": "empty"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no hypernetwork layers"):
        pipe.apply_hypernetwork(tmp_path / "empty.pt")
    broken = OrderedDict(module)
    broken["linear.3.weight"] = torch.zeros(WIDTH, 7)
    torch.save({WIDTH: [broken, broken]}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="do not chain"):
        pipe.apply_hypernetwork(tmp_path / "broken.pt")
    assert pipe.patcher.sources == []


def test_hostile_hypernetwork_files_are_refused_by_name(setup, tmp_path):
    import os

    pipe, module, _ = setup
    from latentforge.adapters.hypernetwork import read_hypernetwork

    os.mkfifo(tmp_path / "pipe.pt")  # torch.load would block on it forever
    with pytest.raises(CheckpointError, match=r"pipe\.pt is not a regular file"):
        read_hypernetwork(tmp_path / "pipe.pt")

    def bad(name: str, change, message: str) -> None:
        m = OrderedDict(module)
        change(m)
        torch.save({WIDTH: [m, m]}, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            pipe.apply_hypernetwork(tmp_path / name)

    bad("name.pt", lambda m: m.update({"linear.x.weight": torch.zeros(2, 2)}), r"has a layer named 'linear\.x\.weight'")
    bad("key.pt", lambda m: m.update({5: torch.zeros(2)}), "has a key 5 that is not a name")
    bad("bias.pt", lambda m: m.update({"linear.0.bias": torch.zeros(3)}), r"linear\.0 .* bias \(3,\)")
    bad("norm.pt", lambda m: m.update({"linear.2.weight": torch.zeros(5)}), r"linear\.2 .* weight \(5,\)")
    bad("nan.pt", lambda m: m["linear.0.weight"].fill_(float("nan")), r"linear\.0 .* holds NaN or Inf")
    assert pipe.patcher.sources == []
