"""A1111 1.10 (extensions-builtin/Lora, modules/textual_inversion) rules for LoRA/LyCORIS files: partly
matching files, bias and norm-layer changes, DoRA's per-input norm, ``dyn``, SDXL embeddings on SD1,
embeddings bundled in a LoRA, and a 4-channel conv_in LoRA on an inpainting model. Each expectation is
written from A1111's rule, not from latentforge's output."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.lora import LoraError, apply_lora
from latentforge.pipelines import networks
from latentforge.pipelines.request import GenerationRequest
from tiny import TEXT_WIDTH, build_reference, save_folder

Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32, no bias
K2 = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear 128 -> 32, no bias
FF = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32, with bias
CONV = "input_blocks.1.0.in_layers.2"  # Conv2d 32 -> 32, 3x3, with bias


def _load(family: str, tmp, seed: int):
    return latentforge.load(save_folder(build_reference(family, seed=seed), tmp / "m"))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _load("sd1", tmp_path_factory.mktemp("a1111lora"), 21)


def _params(net, names) -> dict[str, torch.Tensor]:
    return {n: net.get_parameter(n).detach().clone() for n in names}


def _lora(key: str, out: int, width: int, g, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    return {
        f"{key}.lora_down.weight": torch.randn(rank, width, generator=g) * 0.1,
        f"{key}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1,
        f"{key}.alpha": torch.tensor(alpha),
    }


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def test_a_partly_matching_file_applies_what_matches_and_warns(sd1, tmp_path, caplog):
    """A1111 applies the matched modules and leaves the others (keys_failed_to_match); a file that mostly
    does not match (another family's) is still refused, and one with nothing to apply too."""
    unet = sd1.unet
    g = torch.Generator().manual_seed(1)
    mods = [Q, "input_blocks.1.1.transformer_blocks.0.attn1.to_k", "input_blocks.1.1.transformer_blocks.0.attn1.to_v"]
    sd = {}
    for m in mods:
        sd.update(_lora(_kohya(m), 32, 32, g))
    sd.update(_lora("lora_unet_no_such_layer", 8, 8, g))
    sd["lora_unet_ia3_layer.on_input"] = torch.tensor([1.0])  # a kind latentforge does not know (IA3)
    save_file(sd, tmp_path / "part.safetensors")
    before = _params(unet, [m + ".weight" for m in mods])
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        done = apply_lora(sd1, tmp_path / "part.safetensors", strength=0.7)
    try:
        assert done.unet_modules == 3
        for m in mods:
            key = _kohya(m)
            d = sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] * (2.0 / 4)
            torch.testing.assert_close(unet.get_parameter(m + ".weight"), before[m + ".weight"] + 0.7 * d)
    finally:
        sd1.patcher.remove(done.source)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "part.safetensors" in r.getMessage()]
    assert warned and "2 of 5" in warned[0].getMessage() and "lora_unet_no_such_layer" in warned[0].getMessage()
    assert "ia3_layer" in warned[0].getMessage()
    # fewer than half match: refused, nothing applied
    few = {k: v for k, v in sd.items() if k.startswith(_kohya(Q))}
    for i in range(3):
        few.update(_lora(f"lora_unet_missing_{i}", 8, 8, g))
    save_file(few, tmp_path / "few.safetensors")
    with pytest.raises(LoraError, match=r"few\.safetensors: only 1 of 4 LoRA modules match"):
        apply_lora(sd1, tmp_path / "few.safetensors")
    save_file({"lora_unet_x.oft_blocks": torch.ones(2, 2, 2)}, tmp_path / "oft.safetensors")
    with pytest.raises(LoraError, match=r"oft\.safetensors[: ].*oft_blocks"):
        apply_lora(sd1, tmp_path / "oft.safetensors")
    assert sd1.patcher.sources == []


def test_full_diff_changes_weight_and_bias(sd1, tmp_path):
    """network_full: updown = diff, ex_bias = diff_b, both times the multiplier (no alpha scale)."""
    unet = sd1.unet
    g = torch.Generator().manual_seed(2)
    names = [FF + ".weight", FF + ".bias", CONV + ".weight", CONV + ".bias"]
    before = _params(unet, names)
    sd = {}
    for m in (FF, CONV):
        sd[f"{_kohya(m)}.diff"] = torch.randn(before[m + ".weight"].shape, generator=g) * 0.01
        sd[f"{_kohya(m)}.diff_b"] = torch.randn(before[m + ".bias"].shape, generator=g) * 0.01
        sd[f"{_kohya(m)}.alpha"] = torch.tensor(8.0)  # ignored: a full diff has no rank
    save_file(sd, tmp_path / "full.safetensors")
    done = apply_lora(sd1, tmp_path / "full.safetensors", strength=0.5)
    try:
        for m in (FF, CONV):
            for p, part in (("weight", "diff"), ("bias", "diff_b")):
                got = unet.get_parameter(f"{m}.{p}")
                torch.testing.assert_close(got, before[f"{m}.{p}"] + 0.5 * sd[f"{_kohya(m)}.{part}"])
    finally:
        sd1.patcher.remove(done.source)
    assert all(torch.equal(unet.get_parameter(n), before[n]) for n in names)


@pytest.mark.parametrize(
    "family, unet_names, te_names",
    [
        (
            "sd1",
            {  # kohya's diffusers names -> our (original) module names
                "lora_unet_down_blocks_0_resnets_0_norm1": "input_blocks.1.0.in_layers.0",  # GroupNorm
                "lora_unet_down_blocks_0_attentions_0_norm": "input_blocks.1.1.norm",  # GroupNorm
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1": (
                    "input_blocks.1.1.transformer_blocks.0.norm1"  # LayerNorm
                ),
            },
            {
                "lora_te_text_model_encoder_layers_0_layer_norm1": ("text_encoder", "encoder.layers.0.layer_norm1"),
                "lora_te_text_model_final_layer_norm": ("text_encoder", "final_layer_norm"),
            },
        ),
        (
            "sdxl-base",
            {  # SDXL kohya files use the original names
                "lora_unet_input_blocks_4_1_transformer_blocks_0_norm2": "input_blocks.4.1.transformer_blocks.0.norm2",
                "lora_unet_input_blocks_1_0_out_layers_0": "input_blocks.1.0.out_layers.0",
            },
            {
                "lora_te1_text_model_encoder_layers_1_layer_norm2": ("text_encoder", "encoder.layers.1.layer_norm2"),
                "lora_te2_text_model_encoder_layers_0_layer_norm1": ("text_encoder_2", "encoder.layers.0.layer_norm1"),
            },
        ),
        (
            "sd2",
            {"lora_unet_up_blocks_1_resnets_0_norm2": "output_blocks.3.0.out_layers.0"},
            {"lora_te_text_model_encoder_layers_1_layer_norm1": ("text_encoder", "encoder.layers.1.layer_norm1")},
        ),
    ],
)
def test_norm_layers_take_w_norm_and_b_norm(family, unet_names, te_names, tmp_path):
    """network_norm: updown = w_norm, ex_bias = b_norm, times the UNet or text-encoder multiplier."""
    pipe = _load(family, tmp_path, 22)
    nets = pipe.networks()
    targets = {k: ("unet", v) for k, v in unet_names.items()} | te_names
    g = torch.Generator().manual_seed(3)
    sd, before = {}, {}
    for key, (net, module) in targets.items():
        for p, part in (("weight", "w_norm"), ("bias", "b_norm")):
            value = nets[net].get_parameter(f"{module}.{p}").detach().clone()
            before[(net, module, p)] = value
            sd[f"{key}.{part}"] = torch.randn(value.shape, generator=g) * 0.05
    save_file(sd, tmp_path / "norm.safetensors")
    done = apply_lora(pipe, tmp_path / "norm.safetensors", strength=0.8, text_strength=0.3)
    try:
        for key, (net, module) in targets.items():
            s = 0.8 if net == "unet" else 0.3
            for p, part in (("weight", "w_norm"), ("bias", "b_norm")):
                got = nets[net].get_parameter(f"{module}.{p}")
                torch.testing.assert_close(got, before[(net, module, p)] + s * sd[f"{key}.{part}"])
    finally:
        pipe.patcher.remove(done.source)


def _per_input_norm(merged: torch.Tensor) -> torch.Tensor:
    """A1111 apply_weight_decompose: the norm over every axis but the input channels, kept as [1, in, ...]."""
    dims = [d for d in range(merged.dim()) if d != 1]
    return merged.pow(2).sum(dim=dims, keepdim=True).sqrt()


def test_dora_scale_is_always_divided_by_the_per_input_norm(sd1, tmp_path):
    """A1111: merged * (dora_scale / ||merged||_per input channel), whatever dora_scale's shape; an
    [out, 1] scale (LyCORIS wd_on_out) broadcasts against the [1, in] norm."""
    unet = sd1.unet
    g = torch.Generator().manual_seed(4)
    W = _params(unet, [K2 + ".weight", CONV + ".weight"])
    lin = {**_lora(_kohya(K2), 32, 128, g, alpha=4.0), f"{_kohya(K2)}.dora_scale": torch.rand(32, 1, generator=g) + 0.5}
    conv = {
        f"{_kohya(CONV)}.lora_down.weight": torch.randn(4, 32, 3, 3, generator=g) * 0.1,
        f"{_kohya(CONV)}.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g) * 0.1,
        f"{_kohya(CONV)}.alpha": torch.tensor(2.0),
        f"{_kohya(CONV)}.dora_scale": torch.rand(32, 1, 1, 1, generator=g) + 0.5,
    }
    save_file({**lin, **conv}, tmp_path / "dora.safetensors")
    done = apply_lora(sd1, tmp_path / "dora.safetensors", strength=0.6)
    try:
        got = _params(unet, W)
    finally:
        sd1.patcher.remove(done.source)
    k = _kohya(K2)
    merged = W[K2 + ".weight"] + lin[f"{k}.lora_up.weight"] @ lin[f"{k}.lora_down.weight"] * (4.0 / 4)
    want = merged * (lin[f"{k}.dora_scale"] / _per_input_norm(merged))
    torch.testing.assert_close(got[K2 + ".weight"], W[K2 + ".weight"] + 0.6 * (want - W[K2 + ".weight"]))
    c = _kohya(CONV)
    up, down = conv[f"{c}.lora_up.weight"].flatten(1), conv[f"{c}.lora_down.weight"].flatten(1)
    merged = W[CONV + ".weight"] + (up @ down).reshape(32, 32, 3, 3) * (2.0 / 4)
    want = merged * (conv[f"{c}.dora_scale"] / _per_input_norm(merged))
    torch.testing.assert_close(got[CONV + ".weight"], W[CONV + ".weight"] + 0.6 * (want - W[CONV + ".weight"]))


@pytest.mark.parametrize("tag", ["<lora:dynfile:0.9:0.9:2>", "<lora:dynfile:0.9:dyn=2>", "group"])
def test_dyn_keeps_the_first_ranks_with_the_full_rank_scale(sd1, tmp_path, tag):
    """lyco_helpers.rebuild_conventional: up[:, :dyn] @ down[:dyn], scaled by alpha / the file's rank; the
    request's networks group takes ``dyn`` too."""
    unet = sd1.unet
    g = torch.Generator().manual_seed(5)
    sd = _lora(_kohya(Q), 32, 32, g, rank=4, alpha=3.0)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(sd, folder / "dynfile.safetensors")
    sd1.folders.lora = [folder]
    W = _params(unet, [Q + ".weight"])[Q + ".weight"]
    if tag == "group":
        group = [{"name": "dynfile", "strength": 0.9, "dyn": 2}]
        req = GenerationRequest.from_dict({"prompt": "a cat", "networks": group})
    else:
        req = GenerationRequest(prompt=f"a cat {tag}")
    session = networks.activate(sd1, req)
    try:
        got = unet.get_parameter(Q + ".weight").detach().clone()
    finally:
        session.close(sd1)
        sd1.folders.lora = []
    up, down = sd[f"{_kohya(Q)}.lora_up.weight"], sd[f"{_kohya(Q)}.lora_down.weight"]
    torch.testing.assert_close(got, W + 0.9 * (up[:, :2] @ down[:2]) * (3.0 / 4))
    assert torch.equal(unet.get_parameter(Q + ".weight"), W)


def test_an_sdxl_embedding_is_plain_text_for_sd1(sd1, tmp_path):
    """A1111 skips an embedding whose width (clip_l + clip_g: 2 x 128 here) is not the model's (128)."""
    folder = tmp_path / "emb"
    folder.mkdir()
    g = torch.Generator().manual_seed(6)
    pair = {"clip_l": torch.randn(2, TEXT_WIDTH, generator=g), "clip_g": torch.randn(2, TEXT_WIDTH, generator=g)}
    save_file(pair, folder / "zqpair.safetensors")
    plain = sd1.encode_prompt("a zqpair lamp").context
    sd1.folders.embeddings = [folder]
    try:
        with pytest.warns(UserWarning, match="embedding zqpair"):
            got = sd1.encode_prompt("a zqpair lamp").context
    finally:
        sd1.folders.embeddings = []
    torch.testing.assert_close(got, plain, rtol=0, atol=0)


def test_embeddings_bundled_in_a_lora_work_while_it_is_applied(sd1, tmp_path):
    """networks.load_network: bundle_emb.<name>.string_to_param.* (or clip_l/clip_g) become embeddings while
    the LoRA is active; an embedding of that name in the embeddings folder wins; TI hashes name the LoRA."""
    g = torch.Generator().manual_seed(7)
    vectors = torch.randn(2, TEXT_WIDTH, generator=g) * 0.05
    sd = _lora(_kohya(Q), 32, 32, g)
    sd["bundle_emb.zqbund.string_to_param.*"] = vectors
    sd["bundle_emb.zqxl.clip_l"] = torch.randn(1, TEXT_WIDTH, generator=g)  # an SDXL pair: skipped on SD1
    sd["bundle_emb.zqxl.clip_g"] = torch.randn(1, TEXT_WIDTH, generator=g)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(sd, loras / "withemb.safetensors")
    torch.save({"string_to_param": {"*": vectors}}, tmp_path / "zqbund.pt")
    sd1.folders.lora = [loras]
    plain_xl = sd1.encode_prompt("a zqxl lamp").context  # the LoRA changes no text-encoder weight
    try:
        session = networks.activate(sd1, GenerationRequest(prompt="a zqxl zqbund lamp <lora:withemb:1>"))
        try:
            bundled = sd1.encode_prompt(session.request.prompt).context
            assert session.infotext["TI hashes"] == "zqbund: withemb"
        finally:
            session.close(sd1)
        assert "zqbund" not in sd1.text.embeddings.names()
        with_lora = networks.activate(sd1, GenerationRequest(prompt="a zqxl lamp <lora:withemb:1>"))
        try:
            torch.testing.assert_close(sd1.encode_prompt("a zqxl lamp").context, plain_xl, rtol=0, atol=0)
        finally:
            with_lora.close(sd1)
        # the same vectors loaded as an ordinary embedding (the LoRA's weights applied the same way)
        sd1.load_embedding(tmp_path / "zqbund.pt")
        try:
            done = apply_lora(sd1, loras / "withemb.safetensors")
            want = sd1.encode_prompt("a zqxl zqbund lamp").context
            sd1.patcher.remove(done.source)
        finally:
            sd1.text.embeddings.added.pop("zqbund")
        torch.testing.assert_close(bundled, want)
        # an embeddings-folder file of the same name wins over the bundled one
        folder = tmp_path / "emb"
        folder.mkdir()
        torch.save({"string_to_param": {"*": torch.ones(1, TEXT_WIDTH)}}, folder / "zqbund.pt")
        sd1.folders.embeddings = [folder]
        session = networks.activate(sd1, GenerationRequest(prompt="zqbund <lora:withemb:1>"))
        try:
            assert sd1.text.embeddings.get("zqbund").path == folder / "zqbund.pt"
        finally:
            session.close(sd1)
        assert sd1.text.embeddings.get("zqbund").path == folder / "zqbund.pt"
    finally:
        sd1.folders.lora, sd1.folders.embeddings = [], []


def test_a_4_channel_conv_in_lora_is_zero_padded_on_an_inpainting_model(tmp_path):
    """networks.network_apply_weights: a conv_in update of 4 input channels on a 9-channel conv_in is
    padded with zeros for the 5 mask/masked-image channels."""
    pipe = _load("sd1-inpaint", tmp_path, 23)
    W = pipe.unet.get_parameter("input_blocks.0.0.weight").detach().clone()
    assert W.shape[1] == 9
    g = torch.Generator().manual_seed(8)
    down, up = torch.randn(4, 4, 3, 3, generator=g) * 0.1, torch.randn(W.shape[0], 4, 1, 1, generator=g) * 0.1
    sd = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}
    save_file({**sd, "lora_unet_conv_in.alpha": torch.tensor(2.0)}, tmp_path / "conv_in.safetensors")
    done = apply_lora(pipe, tmp_path / "conv_in.safetensors", strength=0.5)
    got = pipe.unet.get_parameter("input_blocks.0.0.weight").detach().clone()
    pipe.patcher.remove(done.source)
    d = (up.flatten(1) @ down.flatten(1)).reshape(W.shape[0], 4, 3, 3) * (2.0 / 4)
    want = W.clone()
    want[:, :4] += 0.5 * d
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, 4:], W[:, 4:])
    assert torch.equal(pipe.unet.get_parameter("input_blocks.0.0.weight"), W)
