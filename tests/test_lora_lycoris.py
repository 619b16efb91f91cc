"""IA3, OFT (kohya ``oft_blocks``, LyCORIS ``oft_diag``, BOFT) and GLoRA modules, applied as A1111 1.10's
extensions-builtin/Lora applies them. Each expectation is an independent transcription of A1111's formula
(network_ia3.py, network_oft.py, network_glora.py; network.py's finalize_updown multiplies the change by
the strength, calc_scale being 1 for these kinds), never latentforge's own output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.lora import LoraError, apply_lora, read_lora
from tiny import build_reference, save_folder

# tiny SD1 layers: our (original) module name and the kohya/LyCORIS name of SD1 files (diffusers paths)
Q = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
K2 = ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
FF = ("input_blocks.1.1.transformer_blocks.0.ff.net.2", "down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2")
PROJ_IN = ("input_blocks.1.1.proj_in", "down_blocks_0_attentions_0_proj_in")  # Conv2d 32 -> 32, 1x1
CONV = ("input_blocks.1.0.in_layers.2", "down_blocks_0_resnets_0_conv1")  # Conv2d 32 -> 32, 3x3
TE_Q = "encoder.layers.0.self_attn.q_proj"  # text encoder Linear 128 -> 128


def _key(layer: tuple[str, str]) -> str:
    return "lora_unet_" + layer[1]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return latentforge.load(save_folder(build_reference("sd1", seed=31), tmp_path_factory.mktemp("lyco") / "m"))


def _weights(pipe, names: list[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
    nets = pipe.networks()
    return {(net, m): nets[net].get_parameter(m + ".weight").detach().clone() for net, m in names}


def _apply(pipe, sd: dict[str, torch.Tensor], path, names, **kw) -> dict[tuple[str, str], torch.Tensor]:
    """Apply the file, read the given weights, remove it again (checking that the weights come back)."""
    save_file(sd, path)
    before = _weights(pipe, names)
    done = apply_lora(pipe, path, **kw)
    try:
        got = _weights(pipe, names)
    finally:
        pipe.patcher.remove(done.source)
    after = _weights(pipe, names)
    assert all(torch.equal(after[n], before[n]) for n in names)
    return got


def _refused(pipe, sd: dict[str, torch.Tensor], path, match: str) -> None:
    save_file(sd, path)
    names = [("unet", m) for m in (Q[0], K2[0], FF[0], PROJ_IN[0], CONV[0])]
    before = _weights(pipe, names)
    with pytest.raises(LoraError, match=match):
        apply_lora(pipe, path)
    assert pipe.patcher.sources == []
    after = _weights(pipe, names)
    assert all(torch.equal(after[n], before[n]) for n in names)


# ----- A1111's formulas, transcribed ----------------------------------------------------------------------


def a1111_ia3(W: torch.Tensor, w: torch.Tensor, on_input: bool) -> torch.Tensor:
    """network_ia3.NetworkModuleIa3.calc_updown: updown = W * w, w reshaped to a column [-1, 1] unless
    on_input (then broadcast as stored)."""
    return W * (w if on_input else w.reshape(-1, 1))


def _cayley(blocks: torch.Tensor, alpha: float | None, out: int) -> torch.Tensor:
    """network_oft.NetworkModuleOFT.calc_updown (not is_R): Q = blocks - blocksᵀ, its whole Frobenius norm
    clamped to constraint = alpha * out_dim (skipped when the constraint is 0), R = (I + Q)(I - Q)^-1."""
    Q = blocks - blocks.transpose(-1, -2)
    constraint = 0 if alpha is None else alpha * out
    if constraint != 0:
        norm_Q = torch.norm(Q.flatten())
        new_norm_Q = torch.clamp(norm_Q, max=constraint)
        Q = Q * ((new_norm_Q + 1e-8) / (norm_Q + 1e-8))
    eye = torch.eye(blocks.shape[-1])
    return torch.matmul(eye + Q, (eye - Q).float().inverse())


def a1111_oft_merged(W, blocks=None, alpha=None, diag=None, rescale=None) -> torch.Tensor:
    """network_oft: num_blocks = oft_blocks.shape[0] and block_size = out / num_blocks (oft_diag: block_size
    = its shape[1], used as R directly); merged = einsum('k n m, k n ... -> k m ...', R, W in blocks of
    output rows), i.e. each block of rows is Rᵀ @ block: here one block-diagonal matrix, transposed."""
    out = W.shape[0]
    R = diag if diag is not None else _cayley(blocks, alpha, out)
    merged = (torch.block_diag(*R).T @ W.reshape(out, -1)).reshape(W.shape)
    if rescale is not None:  # NetworkModuleOFT.rescale, reshaped (-1, 1, ...)
        merged = rescale.reshape(-1, *[1] * (W.dim() - 1)) * merged
    return merged


def a1111_boft_merged(W: torch.Tensor, blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """network_oft, is_boft (4-d oft_blocks [m, n, b, b]): for each stage i, with k = 2**i * (b // 2):
    rearrange '(c g k) ... -> (c k g) ...' (g = 2), rows in blocks of b times R[i] ('b i j, b j ... ->
    b i ...': not transposed), and the rearrangement undone. Written with row permutations."""
    out = W.shape[0]
    R = _cayley(blocks, alpha, out)
    x = W.reshape(out, -1)
    for i in range(blocks.shape[0]):
        k = 2**i * (blocks.shape[2] // 2)
        # new row (c, kk, gg) is old row (c, gg, kk)
        perm = torch.tensor(
            [c * 2 * k + gg * k + kk for c in range(out // (2 * k)) for kk in range(k) for gg in (0, 1)]
        )
        x = torch.block_diag(*R[i]) @ x[perm]
        x = x[torch.argsort(perm)]
    return x.reshape(W.shape)


def a1111_glora(W, a1, a2, b1, b2) -> torch.Tensor:
    """network_glora.NetworkModuleGLora.calc_updown: updown = (w2b @ w1b) + ((W @ w2a) @ w1a) with
    w1a = a1.weight, w1b = b1.weight, w2a = a2.weight, w2b = b2.weight; alpha is required but unused."""
    return (b2 @ b1) + ((W @ a2) @ a1)


# ----- the kinds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_ia3_scales_output_rows_or_input_columns(sd1, tmp_path, strength):
    g = torch.Generator().manual_seed(1)
    sd = {
        # LyCORIS Linear, train_on_input=False: weight [out], on_input 0
        f"{_key(Q)}.weight": torch.randn(32, generator=g) * 0.3,
        f"{_key(Q)}.on_input": torch.tensor(0),
        # on_input: weight [in] scales the input columns
        f"{_key(FF)}.weight": torch.randn(128, generator=g) * 0.3,
        f"{_key(FF)}.on_input": torch.tensor(1),
        # LyCORIS conv, train_on_input=True: weight [1, in, 1, 1]
        f"{_key(CONV)}.weight": torch.randn(1, 32, 1, 1, generator=g) * 0.3,
        f"{_key(CONV)}.on_input": torch.tensor(1),
        # no on_input: taken as LyCORIS's default (output channels)
        f"{_key(K2)}.weight": torch.randn(32, generator=g) * 0.3,
        # a text-encoder layer, at the text strength
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.weight": torch.randn(128, generator=g) * 0.3,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.on_input": torch.tensor(0),
    }
    names = [("unet", m) for m in (Q[0], FF[0], CONV[0], K2[0])] + [("text_encoder", TE_Q)]
    W = _weights(sd1, names)
    got = _apply(sd1, sd, tmp_path / "ia3.safetensors", names, strength=strength, text_strength=0.25)
    assert read_lora(tmp_path / "ia3.safetensors").kinds == {"ia3": 5}
    for layer, on_input in ((Q, False), (FF, True), (CONV, True), (K2, False)):
        w = W[("unet", layer[0])]
        want = w + strength * a1111_ia3(w, sd[f"{_key(layer)}.weight"], on_input)
        torch.testing.assert_close(got[("unet", layer[0])], want)
    w = W[("text_encoder", TE_Q)]
    want = w + 0.25 * a1111_ia3(w, sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.weight"], False)
    torch.testing.assert_close(got[("text_encoder", TE_Q)], want)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_oft_blocks_rotate_output_channel_blocks(sd1, tmp_path, strength):
    """kohya's OFT (oft_unet_ + the original names, which A1111 matches; alpha the constraint) and
    LyCORIS's oft_blocks/oft_diag, on Linear and 1x1 / 3x3 Conv layers."""
    g = torch.Generator().manual_seed(2)
    sd = {
        # kohya, a small constraint that clamps Q: 4 blocks of 8 on a 1x1 conv
        "oft_unet_input_blocks_1_1_proj_in.oft_blocks": torch.randn(4, 8, 8, generator=g) * 0.1,
        "oft_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1e-3),
        # a constraint that does not bind: 2 blocks of 16 on a Linear
        f"{_key(Q)}.oft_blocks": torch.randn(2, 16, 16, generator=g) * 0.05,
        f"{_key(Q)}.alpha": torch.tensor(10.0),
        # no alpha (constraint 0: no clamp), 8 blocks of 4 on a 3x3 conv, with a LyCORIS rescale
        f"{_key(CONV)}.oft_blocks": torch.randn(8, 4, 4, generator=g) * 0.2,
        f"{_key(CONV)}.rescale": 1 + torch.randn(32, 1, 1, 1, generator=g) * 0.1,
        # old LyCORIS: oft_diag [n, b, b] is R itself (4 blocks of 8 here), alpha unused
        f"{_key(K2)}.oft_diag": torch.eye(8).repeat(4, 1, 1) + torch.randn(4, 8, 8, generator=g) * 0.1,
        f"{_key(K2)}.alpha": torch.tensor(3.0),
    }
    names = [("unet", m) for m in (PROJ_IN[0], Q[0], CONV[0], K2[0])]
    W = _weights(sd1, names)
    got = _apply(sd1, sd, tmp_path / "oft.safetensors", names, strength=strength)
    want = {
        PROJ_IN[0]: a1111_oft_merged(
            W[("unet", PROJ_IN[0])], sd["oft_unet_input_blocks_1_1_proj_in.oft_blocks"], alpha=1e-3
        ),
        Q[0]: a1111_oft_merged(W[("unet", Q[0])], sd[f"{_key(Q)}.oft_blocks"], alpha=10.0),
        CONV[0]: a1111_oft_merged(
            W[("unet", CONV[0])], sd[f"{_key(CONV)}.oft_blocks"], rescale=sd[f"{_key(CONV)}.rescale"]
        ),
        K2[0]: a1111_oft_merged(W[("unet", K2[0])], diag=sd[f"{_key(K2)}.oft_diag"]),
    }
    for m, merged in want.items():
        w = W[("unet", m)]
        # updown = merged - W, times the multiplier
        torch.testing.assert_close(got[("unet", m)], w + strength * (merged - w), atol=2e-5, rtol=1e-4)
    if strength == 1.0:  # a Cayley rotation keeps each block's Frobenius norm (the rescaled conv aside)
        for m, b in ((PROJ_IN[0], 8), (Q[0], 16)):
            torch.testing.assert_close(_block_norms(got[("unet", m)], b), _block_norms(W[("unet", m)], b))
    # the constraint binds for proj_in (alpha 1e-3): without the clamp the result would differ
    w = W[("unet", PROJ_IN[0])]
    unclamped = a1111_oft_merged(w, sd["oft_unet_input_blocks_1_1_proj_in.oft_blocks"])
    assert (got[("unet", PROJ_IN[0])] - (w + strength * (unclamped - w))).abs().max() > 1e-3


def _block_norms(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.reshape(-1, size * t[0].numel()).norm(dim=1)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_boft_applies_its_butterfly_stages(sd1, tmp_path, strength):
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn(2, 4, 8, 8, generator=g) * 0.1  # 2 stages of 4 blocks of 8 on 32 output channels
    sd = {f"{_key(FF)}.oft_blocks": blocks, f"{_key(FF)}.alpha": torch.tensor(0.01)}
    names = [("unet", FF[0])]
    W = _weights(sd1, names)[names[0]]
    got = _apply(sd1, sd, tmp_path / "boft.safetensors", names, strength=strength)[names[0]]
    assert read_lora(tmp_path / "boft.safetensors").kinds == {"boft": 1}
    merged = a1111_boft_merged(W, blocks, 0.01)
    torch.testing.assert_close(got, W + strength * (merged - W), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_glora_adds_b2_b1_and_w_a2_a1(sd1, tmp_path, strength):
    g = torch.Generator().manual_seed(4)

    def glora(out: int, inp: int, rank: int) -> dict[str, torch.Tensor]:
        # LyCORIS's Linear GLoRA: a1 Linear(in, r), a2 Linear(r, in), b1 Linear(in, r), b2 Linear(r, out)
        shapes = {
            "a1.weight": (rank, inp),
            "a2.weight": (inp, rank),
            "b1.weight": (rank, inp),
            "b2.weight": (out, rank),
        }
        return {p: torch.randn(*s, generator=g) * 0.1 for p, s in shapes.items()} | {"alpha": torch.tensor(2.0)}

    mods = {FF: glora(32, 128, 4), Q: glora(32, 32, 2)}
    te = glora(128, 128, 4)
    sd = {f"{_key(layer)}.{p}": t for layer, parts in mods.items() for p, t in parts.items()}
    sd |= {f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{p}": t for p, t in te.items()}
    names = [("unet", FF[0]), ("unet", Q[0]), ("text_encoder", TE_Q)]
    W = _weights(sd1, names)
    got = _apply(sd1, sd, tmp_path / "glora.safetensors", names, strength=strength, text_strength=0.5)
    for (net, m), parts, s in (
        (names[0], mods[FF], strength),
        (names[1], mods[Q], strength),
        (names[2], te, 0.5),
    ):
        w = W[(net, m)]
        d = a1111_glora(w, parts["a1.weight"], parts["a2.weight"], parts["b1.weight"], parts["b2.weight"])
        torch.testing.assert_close(got[(net, m)], w + s * d)  # alpha 2 over rank 4/2: no scale (calc_scale 1)


def test_a_file_mixing_lora_and_oft_applies_both(sd1, tmp_path):
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 128, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1
    blocks = torch.randn(4, 8, 8, generator=g) * 0.1
    sd = {
        f"{_key(K2)}.lora_down.weight": down,
        f"{_key(K2)}.lora_up.weight": up,
        f"{_key(K2)}.alpha": torch.tensor(2.0),
        f"{_key(Q)}.oft_blocks": blocks,
        f"{_key(Q)}.alpha": torch.tensor(1.0),
    }
    names = [("unet", K2[0]), ("unet", Q[0])]
    W = _weights(sd1, names)
    got = _apply(sd1, sd, tmp_path / "mix.safetensors", names, strength=0.7)
    assert read_lora(tmp_path / "mix.safetensors").kinds == {"lora": 1, "oft": 1}
    torch.testing.assert_close(got[names[0]], W[names[0]] + 0.7 * (up @ down) * (2.0 / 4))
    merged = a1111_oft_merged(W[names[1]], blocks, alpha=1.0)
    torch.testing.assert_close(got[names[1]], W[names[1]] + 0.7 * (merged - W[names[1]]), atol=2e-5, rtol=1e-4)


# ----- what is refused --------------------------------------------------------------------------------------


def _good(g) -> dict[str, torch.Tensor]:
    return {
        f"{_key(K2)}.lora_down.weight": torch.randn(4, 128, generator=g),
        f"{_key(K2)}.lora_up.weight": torch.randn(32, 4, generator=g),
    }


@pytest.mark.parametrize(
    "layer, parts, why",
    [
        (Q, {"oft_blocks": (3, 10, 10)}, r"not \[blocks, size, size\] with a number of blocks that divides"),
        (Q, {"oft_blocks": (4, 4, 4)}, r"are not 4 blocks of 8 x 8"),
        (Q, {"oft_blocks": (4, 8, 8), "rescale": (31,)}, r"rescale of 31 values"),
        (Q, {"oft_diag": (4, 8, 4)}, r"oft_diag of shape \[4, 8, 4\]"),
        (FF, {"oft_blocks": (4, 4, 8, 8)}, r"BOFT blocks of shape \[4, 4, 8, 8\] do not fit"),
        (Q, {"weight": (31,), "on_input": 0}, r"IA3 output-channel scale .*\[31, 1\]"),
        (FF, {"weight": (32,), "on_input": 1}, r"IA3 input-channel scale .*\[32\]"),
        (
            CONV,
            {"weight": (1, 32, 1, 1)},
            r"IA3 output-channel scale .*\[32, 1\]\) does not broadcast .*\[32, 32, 3, 3\] weight \(A1111 fails",
        ),
        (FF, {"a1.weight": (4, 128), "a2.weight": (128, 4), "b1.weight": (4, 128)}, r"it has no b2\.weight"),
        (
            FF,
            {"a1.weight": (4, 32), "a2.weight": (32, 4), "b1.weight": (4, 128), "b2.weight": (32, 4)},
            r"GLoRA factors a1\.weight \[4, 32\], a2\.weight \[32, 4\]",
        ),
        (
            CONV,
            {"a1.weight": (4, 32, 1, 1), "a2.weight": (32, 4, 1, 1), "b1.weight": (4, 32, 3, 3), "b2.weight": (32, 4)},
            r"Linear layer's 2-d weight, not a \[32, 32, 3, 3\]",
        ),
    ],
)
def test_parts_that_do_not_fit_are_refused_clearly(sd1, tmp_path, layer, parts, why):
    g = torch.Generator().manual_seed(6)
    sd = _good(g)
    for p, s in parts.items():  # shapes, and on_input's value
        sd[f"{_key(layer)}.{p}"] = torch.tensor(s) if p == "on_input" else torch.randn(*s, generator=g) * 0.1
    _refused(
        sd1, sd, tmp_path / "bad.safetensors", rf"bad\.safetensors: module {_key(layer)} \(.*\) does not fit .*{why}"
    )


def test_an_on_input_of_two_numbers_is_refused(sd1, tmp_path):
    sd = {f"{_key(Q)}.weight": torch.ones(32), f"{_key(Q)}.on_input": torch.tensor([1, 0])}
    _refused(
        sd1, sd, tmp_path / "two.safetensors", r"two\.safetensors: .*on_input.* has shape \[2\]; an on_input is one"
    )


def test_fused_qkv_and_inpainting_conv_in_are_refused(tmp_path):
    """A1111 hands these kinds a layer's own weight: OpenCLIP's fused in_proj (one file module for our
    q/k/v) has none of its own, and an inpainting conv_in's change is padded from 4 to 9 channels, which
    fails for a change computed from the 9-channel weight; both are refused, the file left unapplied."""
    sd2 = latentforge.load(save_folder(build_reference("sd2", seed=32), tmp_path / "sd2"))
    key = "lora_te_transformer_resblocks_1_attn_in_proj"
    save_file({f"{key}.oft_blocks": torch.zeros(4, 96, 96)}, tmp_path / "fused.safetensors")
    with pytest.raises(LoraError, match=rf"fused\.safetensors: module {key} is OFT on a fused q/k/v projection"):
        apply_lora(sd2, tmp_path / "fused.safetensors")
    assert sd2.patcher.sources == []
    inpaint = latentforge.load(save_folder(build_reference("sd1-inpaint", seed=33), tmp_path / "inp"))
    save_file({"lora_unet_conv_in.weight": torch.ones(1, 9, 1, 1), "lora_unet_conv_in.on_input": torch.tensor(1)},
              tmp_path / "conv_in.safetensors")  # fmt: skip
    with pytest.raises(LoraError, match=r"conv_in\.safetensors: module lora_unet_conv_in is IA3 on an inpainting"):
        apply_lora(inpaint, tmp_path / "conv_in.safetensors")
    assert inpaint.patcher.sources == []


def test_only_kohya_style_names_take_a_bare_weight_part():
    """A1111 splits a tensor name at its first dot, so IA3's part is a bare ``weight``; latentforge takes it
    only after a dotless ``lora_`` name, so checkpoint and upscaler tensors do not read as IA3 modules."""
    from latentforge.adapters.keys import split_key

    assert split_key("lora_unet_down_blocks_0_attentions_0_proj_in.weight") == (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "weight",
    )
    assert split_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.a1.weight")[1] == "a1.weight"
    assert split_key("oft_unet_input_blocks_4_1_proj_in.oft_blocks") == (
        "oft_unet_input_blocks_4_1_proj_in",
        "oft_blocks",
    )
    for key in ("conv_first.weight", "model.diffusion_model.input_blocks.0.0.weight", "lora_unet_x.y.weight"):
        assert split_key(key) is None
