"""LoRA and LyCORIS files: parity with diffusers' loaders, the formulas of LoHa/LoKr/DoRA/LoCon, exact
restore, prompt tags, and the errors for files that do not fit."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import diffusers as D
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.folders import AdapterNotFound
from latentforge.adapters.lora import LoraError, apply_lora
from tiny import build_reference, close, hf_tokenizer, save_folder


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _pipe_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, net in pipe.networks().items() for k, v in _state(net).items()}


def _factors(m: torch.nn.Module, g: torch.Generator, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(m, torch.nn.Linear):
        return torch.randn(rank, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, rank, generator=g) * 0.1
    down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.1
    return down, torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.1


def _lora_modules(module: torch.nn.Module, unet: bool, resnets: bool = True):
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        res = resnets and ("resnets" in name or "in_layers" in name)
        if unet and ("attentions" in name or "transformer_blocks" in name or res):
            yield name, m
        if not unet and ".layers." in f".{name}":
            yield name, m


def kohya_and_peft(ref, ours, scheme: str, seed: int = 0, resnets: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA on every attention/res-block layer of the UNet and every text-encoder layer, written in one
    naming scheme: kohya with diffusers UNet names (SD1), kohya with original names (SDXL), or PEFT."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    # the UNet modules by the name the scheme uses: diffusers names from the reference model, original
    # (SGM) names from ours, whose names are the original checkpoint's (checked by test_parity)
    unet = ours.unet if scheme == "kohya-sgm" else ref.unet
    for name, m in _lora_modules(unet, True, resnets):
        down, up = _factors(m, g)
        if scheme == "peft":
            sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
        else:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(2.0)
    n = len(ref.text_encoders)
    for i, enc in enumerate(ref.text_encoders):
        for name, m in _lora_modules(enc, False):
            down, up = _factors(m, g)
            path = f"text_model.{name.removeprefix('text_model.')}"
            if scheme == "peft":
                prefix = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
                sd[f"{prefix}.{path}.lora_A.weight"], sd[f"{prefix}.{path}.lora_B.weight"] = down, up
            else:
                key = ("lora_te_" if n == 1 else f"lora_te{i + 1}_") + path.replace(".", "_")
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(3.0)
    return sd


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1lora")
    ref = build_reference("sd1", seed=3)
    return ref, latentforge.load(save_folder(ref, tmp / "m")), tmp


def _unet_io(ref, g, sdxl: bool = False):
    cfg = ref.unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    if not sdxl:
        return x, t, ctx, {}, None
    from latentforge.conditioning import sdxl_vector
    from tiny import TIME_DIM

    pooled = torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * TIME_DIM, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    return (
        x,
        t,
        ctx,
        {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
        sdxl_vector(pooled, ids, TIME_DIM),
    )


def _check_against_diffusers(ref, ours, sd, path, tmp, sdxl: bool, strength: float):
    save_file(sd, path)
    unet, encoders = copy.deepcopy(ref.unet), [copy.deepcopy(e) for e in ref.text_encoders]
    toks = [hf_tokenizer(p, tmp / f"tok{i}") for i, p in enumerate(ref.spec.pads)]
    sched = D.EulerDiscreteScheduler()
    if sdxl:
        pipe = D.StableDiffusionXLPipeline(ref.vae, encoders[0], encoders[1], toks[0], toks[1], unet, sched)
    else:
        pipe = D.StableDiffusionPipeline(
            ref.vae, encoders[0], toks[0], unet, sched, None, None, requires_safety_checker=False
        )
    before = [_state(m) for m in (unet, *encoders)]
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    for m, b in zip((unet, *encoders), before):  # diffusers applied the file to every network
        assert any(not torch.equal(v, m.state_dict()[k]) for k, v in b.items())

    original = _pipe_state(ours)
    apply_lora(ours, path, strength=strength)
    try:
        g = torch.Generator().manual_seed(1)
        x, t, ctx, kwargs, y = _unet_io(ref, g, sdxl)
        with torch.no_grad():
            ok, diff, scale = close(ours.unet(x, t, ctx, y), unet(x, t, encoder_hidden_states=ctx, **kwargs).sample)
            assert ok, f"UNet with LoRA: max diff {diff:.3g} vs {scale:.3g}"
            ids = torch.randint(0, 49000, (1, 77), generator=g)
            for enc_ours, enc_ref in zip(ours.text_encoders, encoders):
                ok, diff, scale = close(enc_ours(ids).hidden, enc_ref(ids).last_hidden_state)
                assert ok, f"text encoder with LoRA: max diff {diff:.3g} vs {scale:.3g}"
    finally:
        ours.remove_lora(path)
    after = _pipe_state(ours)
    assert all(torch.equal(original[k], after[k]) for k in original)  # bit for bit


@pytest.mark.parametrize("scheme", ["kohya-diffusers", "peft"])
def test_sd1_lora_matches_diffusers_fuse_lora(sd1, scheme):
    ref, ours, tmp = sd1
    sd = kohya_and_peft(ref, ours, scheme)
    _check_against_diffusers(ref, ours, sd, tmp / f"{scheme}.safetensors", tmp, sdxl=False, strength=0.7)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxllora")
    ref = build_reference("sdxl-base", seed=4)
    return ref, latentforge.load(save_folder(ref, tmp / "m"))


@pytest.mark.parametrize("scheme", ["kohya-sgm", "peft"])
def test_sdxl_lora_matches_diffusers_fuse_lora(sdxl, tmp_path, scheme):
    ref, ours = sdxl
    sd = kohya_and_peft(ref, ours, scheme, seed=5, resnets=False)  # LoCon on res blocks: the SD1 test
    assert any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in sd)
    _check_against_diffusers(ref, ours, sd, tmp_path / "x.safetensors", tmp_path, sdxl=True, strength=0.8)


def test_old_processor_spelling_equals_peft(sd1, tmp_path):
    _, ours, _ = sd1
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    old = {f"unet.{base}.processor.to_out_lora.down.weight": down, f"unet.{base}.processor.to_out_lora.up.weight": up}
    save_file(old, tmp_path / "old.safetensors")
    w = ours.unet.get_parameter("input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight")
    expected = w.detach().clone() + 0.5 * up @ down
    ours.apply_lora(tmp_path / "old.safetensors", strength=0.5)
    try:
        torch.testing.assert_close(w.detach(), expected)
    finally:
        ours.remove_lora("old")


def _loha(w1a, w1b, w2a, w2b, alpha):
    return (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0]


def test_loha_lokr_dora_and_tucker_locon_follow_their_formulas(sd1, tmp_path):
    _, ours, _ = sd1
    g = torch.Generator().manual_seed(8)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
    ff = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32
    k2 = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear 128 -> 32
    v2 = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"  # Linear 128 -> 32
    conv = "input_blocks.1.0.in_layers.2"  # Conv2d 32 -> 32, 3x3
    loha = {"hada_w1_a": r(32, 4), "hada_w1_b": r(4, 32), "hada_w2_a": r(32, 4), "hada_w2_b": r(4, 32)}
    lokr = {"lokr_w1": r(4, 8), "lokr_w2_a": r(8, 2), "lokr_w2_b": r(2, 16)}  # kron: (4*8) x (8*16)
    dora = {"lora_down.weight": r(4, 128), "lora_up.weight": r(32, 4), "dora_scale": r(32, 1).abs() + 0.5}
    dora_in = {"lora_down.weight": r(4, 128), "lora_up.weight": r(32, 4), "dora_scale": r(1, 128).abs() + 0.5}
    tucker = {"lora_down.weight": r(4, 32, 1, 1), "lora_mid.weight": r(4, 4, 3, 3), "lora_up.weight": r(32, 4, 1, 1)}
    sd = {}
    for module, parts, alpha in (
        (q, loha, 2.0),
        (ff, lokr, 1.0),
        (k2, dora, 4.0),
        (v2, dora_in, 2.0),
        (conv, tucker, 4.0),
    ):
        key = "lora_unet_" + module.replace(".", "_")
        sd.update({f"{key}.{p}": t for p, t in parts.items()})
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, tmp_path / "lyco.safetensors")
    W = {m: ours.unet.get_parameter(m + ".weight").detach().clone() for m in (q, ff, k2, v2, conv)}
    ours.apply_lora(tmp_path / "lyco.safetensors", strength=0.5)
    try:
        got = {m: ours.unet.get_parameter(m + ".weight").detach().clone() for m in W}
    finally:
        ours.remove_lora("lyco")
    # LoHa: Hadamard product of two low-rank products, alpha / rank, times the strength
    torch.testing.assert_close(got[q], W[q] + 0.5 * _loha(*loha.values(), 2.0))
    # LoKr: Kronecker product; w1 is whole and w2 low-rank (rank 2), so alpha / 2 applies
    w2 = lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]
    kron = torch.stack([torch.cat([lokr["lokr_w1"][i, j] * w2 for j in range(8)], 1) for i in range(4)]).reshape(
        32, 128
    )
    torch.testing.assert_close(got[ff], W[ff] + 0.5 * kron * (1.0 / 2))
    # DoRA with an [out, 1] dora_scale (LyCORIS wd_on_out): A1111's apply_weight_decompose still divides by
    # the per-input-column norm, the [out, 1] scale broadcasting against it; strength blends from W
    merged = W[k2] + dora["lora_up.weight"] @ dora["lora_down.weight"] * (4.0 / 4)
    direction = merged / merged.norm(dim=0, keepdim=True)
    torch.testing.assert_close(got[k2], W[k2] + 0.5 * (dora["dora_scale"] * direction - W[k2]))
    # DoRA with a [1, in] magnitude (LyCORIS without wd_on_out): normalised per input column
    merged = W[v2] + dora_in["lora_up.weight"] @ dora_in["lora_down.weight"] * (2.0 / 4)
    direction = merged / merged.norm(dim=0, keepdim=True)
    torch.testing.assert_close(got[v2], W[v2] + 0.5 * (dora_in["dora_scale"] * direction - W[v2]))
    # Tucker LoCon: the merged conv equals down (1x1) -> mid (3x3) -> up (1x1) applied in turn
    x = torch.randn(1, 32, 9, 9, generator=g)
    chain = F.conv2d(F.conv2d(F.conv2d(x, tucker["lora_down.weight"]), tucker["lora_mid.weight"], padding=1),
                     tucker["lora_up.weight"])  # fmt: skip
    torch.testing.assert_close(
        F.conv2d(x, got[conv] - W[conv], padding=1), 0.5 * chain * (4.0 / 4), atol=1e-4, rtol=1e-4
    )


def test_fused_openclip_in_proj_lands_on_q_k_v(tmp_path):
    ours = latentforge.load(save_folder(build_reference("sd2", seed=9), tmp_path / "m"))
    g = torch.Generator().manual_seed(10)
    down, up = torch.randn(4, 128, generator=g), torch.randn(3 * 128, 4, generator=g)
    key = "lora_te_transformer_resblocks_1_attn_in_proj"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, tmp_path / "oc.safetensors")
    enc = ours.text_encoders[0]
    before = {p: enc.get_parameter(f"encoder.layers.1.self_attn.{p}_proj.weight").detach().clone() for p in "qkv"}
    ours.apply_lora(tmp_path / "oc.safetensors")
    delta = up @ down  # [3W, W]: rows 0..W-1 are q, then k, then v (OpenCLIP's in_proj layout)
    for i, p in enumerate("qkv"):
        got = enc.get_parameter(f"encoder.layers.1.self_attn.{p}_proj.weight").detach()
        torch.testing.assert_close(got, before[p] + delta[i * 128 : (i + 1) * 128])
    ours.remove_lora()
    assert all(torch.equal(enc.get_parameter(f"encoder.layers.1.self_attn.{p}_proj.weight"), before[p]) for p in "qkv")


def _tensor_data_sha256(path) -> str:
    """The safetensors layout: 8-byte little-endian header length, the JSON header, then the tensor data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n :]).hexdigest()


def test_prompt_tag_applies_for_the_request_only(sd1, tmp_path):
    ref, ours, _ = sd1
    folder = tmp_path / "loras" / "styles"
    folder.mkdir(parents=True)
    sd = kohya_and_peft(ref, ours, "kohya-diffusers", seed=11)
    save_file(sd, folder / "ink.safetensors", metadata={"ss_output_name": "ink"})
    ours.folders.lora = [tmp_path / "loras"]
    original = _pipe_state(ours)
    options = dict(steps=2, width=64, height=64, seed=5, sampler="Euler")
    plain = ours.txt2img("a red circle", **options)
    tagged = ours.txt2img("a red circle <lora:ink:0.6:0.9>", **options)
    after = _pipe_state(ours)
    assert all(torch.equal(original[k], after[k]) for k in original) and ours.patcher.sources == []
    assert tagged.images[0].tobytes() != plain.images[0].tobytes()
    text = tagged.infotexts[0]
    assert text.startswith("a red circle <lora:ink:0.6:0.9>")
    assert f'Lora hashes: "ink: {_tensor_data_sha256(folder / "ink.safetensors")[:12]}"' in text
    # the tag equals the request group (A1111 order: te weight first, then unet)
    grouped = ours.txt2img(
        "a red circle ", networks=[{"name": "ink", "strength": 0.9, "text_strength": 0.6}], **options
    )
    assert grouped.images[0].tobytes() == tagged.images[0].tobytes()
    with pytest.raises(AdapterNotFound, match="close names: ink"):
        ours.txt2img("a red circle <lora:inc:1>", **options)
    assert ours.patcher.sources == []
    ours.folders.lora = []


def test_a_lora_applied_to_the_pipeline_is_recorded_in_each_image(sd1, tmp_path):
    """``pipe.apply_lora`` (not a prompt tag): the infotext names its hash as A1111 does, the JSON record
    lists it (by path, with its strengths) so ``--from`` on a fresh pipeline makes the same pixels, and an
    infotext alone, which cannot say how strongly it was applied, makes ``--from`` refuse instead of
    silently making another image. Taken back, it is no longer recorded."""
    from latentforge import save_image
    from latentforge.cli import main
    from latentforge.pipelines import GenerationRequest
    from latentforge.pipelines.metadata import read_png_metadata, request_from_infotext, unreproduced_fields

    ref, ours, tmp = sd1
    path = tmp_path / "ink.safetensors"
    save_file(kohya_and_peft(ref, ours, "kohya-diffusers", seed=12), path)
    options = dict(steps=2, width=64, height=64, seed=5, sampler="Euler")
    ours.apply_lora(path, strength=0.7, text_strength=0.4)
    try:
        made = ours.txt2img("a red circle", **options)
    finally:
        ours.remove_lora()
    text = made.infotexts[0]
    assert f'Lora hashes: "ink: {_tensor_data_sha256(path)[:12]}"' in text
    png = tmp_path / "made.png"
    save_image(made.images[0], png)
    record = read_png_metadata(png)["latentforge"]
    assert record["request"]["networks"] == [
        {"name": str(path.resolve()), "kind": "lora", "strength": 0.7, "text_strength": 0.4}
    ]
    again = tmp_path / "again.png"
    assert main(["txt2img", "--from", str(png), "-m", str(tmp / "m"), "-q", "-o", str(again)]) == 0
    assert _png_pixels(again) == made.images[0].convert("RGB").tobytes()
    assert unreproduced_fields(request_from_infotext(text)[0]) == ["Lora hashes"]
    tagged = text.replace("a red circle", "a red circle <lora:ink:0.4:0.7>", 1)
    assert unreproduced_fields(request_from_infotext(tagged)[0]) == []
    twice = tagged.replace('Lora hashes: "ink: ', 'Lora hashes: "ink: 0123456789ab, ink: ', 1)  # applied + tag
    assert unreproduced_fields(request_from_infotext(twice)[0]) == ["Lora hashes"]
    assert "Lora hashes" not in ours.txt2img("a red circle", **options).infotexts[0]
    # the record run again while the LoRA is still applied: not applied twice, named once, by its stem
    again_req = GenerationRequest.from_dict(record["request"])
    ours.apply_lora(path, strength=0.7, text_strength=0.4)
    try:
        rerun = ours.txt2img(request=again_req)
    finally:
        ours.remove_lora()
    assert rerun.images[0].tobytes() == made.images[0].tobytes()
    assert rerun.infotexts[0].count("ink: ") == 1 and str(tmp_path) not in rerun.infotexts[0]
    # what is recorded follows the patcher: taken back, or applied again by the adapter function itself
    ours.apply_lora(path, strength=0.7)
    ours.patcher.remove("lora:ink")
    apply_lora(ours, path, strength=0.2)
    try:
        assert [(r.strength, r.kind) for r, _ in ours.applied_networks()] == [(0.2, "lora")]
    finally:
        ours.remove_lora()
    assert ours.applied_networks() == []
    by_path = ours.txt2img("a red circle", networks=[record["request"]["networks"][0]], **options)
    assert by_path.images[0].tobytes() == made.images[0].tobytes()
    assert f'Lora hashes: "ink: {_tensor_data_sha256(path)[:12]}"' in by_path.infotexts[0]  # the stem, no path


def _png_pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_files_that_do_not_fit_are_refused_whole(sd1, sdxl, tmp_path):
    ref, ours, _ = sd1
    xl_ref = sdxl[0]
    original = _pipe_state(ours)
    sd = {}
    for i, name in enumerate(["input_blocks_4_1_transformer_blocks_0_attn2_to_k", "input_blocks_1_1_proj_in"]):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, 256 if i == 0 else 64)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(64, 4)
    save_file(sd, tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match=r"xl\.safetensors.*(sdxl-base|only 1 of 2|does not fit)"):
        ours.apply_lora(tmp_path / "xl.safetensors")
    full = kohya_and_peft(xl_ref, ours, "peft")
    save_file(full, tmp_path / "xl2.safetensors")
    with pytest.raises(LoraError, match=r"xl2\.safetensors: only \d+ of \d+ LoRA modules match this sd1 model"):
        ours.apply_lora(tmp_path / "xl2.safetensors")
    good = tmp_path / "good.safetensors"
    save_file(kohya_and_peft(ref, ours, "peft"), good)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraError, match=r"corrupt\.safetensors is truncated"):
        ours.apply_lora(corrupt)
    header = json.dumps({"x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(LoraError, match=r"junk\.safetensors: only 0 of 1"):
        ours.apply_lora(tmp_path / "junk.safetensors")
    after = _pipe_state(ours)
    assert ours.patcher.sources == [] and all(torch.equal(original[k], after[k]) for k in original)


def test_several_loras_compose_and_remove_one_by_one(sd1, tmp_path):
    ref, ours, _ = sd1
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(kohya_and_peft(ref, ours, "peft", seed=13), a)
    save_file(kohya_and_peft(ref, ours, "kohya-diffusers", seed=14), b)
    original = _pipe_state(ours)
    ours.apply_lora(b, strength=0.3)
    only_b = _pipe_state(ours)
    ours.apply_lora(a)
    assert ours.patcher.sources == ["lora:b", "lora:a"]
    ours.remove_lora("a")
    now = _pipe_state(ours)
    assert all(torch.equal(only_b[k], now[k]) for k in now)  # recomputed from the backup, no drift
    ours.remove_lora()
    now = _pipe_state(ours)
    assert all(torch.equal(original[k], now[k]) for k in now)


def test_cli_inspect_and_models_dir(sd1, tmp_path, capsys):
    from latentforge.cli import main

    ref, ours, tmp = sd1
    model = tmp / "m"
    root = tmp_path / "ComfyUI"
    (root / "models" / "loras").mkdir(parents=True)
    save_file(kohya_and_peft(ref, ours, "kohya-diffusers", seed=15), root / "models" / "loras" / "ink.safetensors")
    assert main(["inspect", str(root / "models" / "loras" / "ink.safetensors"), "-m", str(model)]) == 0
    out = capsys.readouterr().out
    n = len(list(_lora_modules(ref.unet, True))) + len(list(_lora_modules(ref.text_encoders[0], False)))
    assert "LoRA/LyCORIS adapter" in out and f"kinds:       lora {n}" in out and "fits: yes" in out
    assert f"{n} of {n} modules match" in out
    png = tmp_path / "out.png"
    args = ["txt2img", "a cat <lora:ink:0.5>", "-m", str(model), "--steps", "1", "-W", "64", "-H", "64", "-q"]
    assert main([*args, "--models-dir", str(root), "-o", str(png)]) == 0
    from latentforge.pipelines.metadata import read_png_metadata

    assert "Lora hashes" in read_png_metadata(png)["parameters"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    assert "no LoRA folder is set" in capsys.readouterr().err


def test_tags_are_read_as_a1111_reads_them():
    from latentforge.conditioning.prompt import extract_network_tags
    from latentforge.pipelines.networks import refs_from_tags

    text, tags = extract_network_tags("a cat <lora:ink:0.5>, <lyco:sub/hat:0.4:0.9> (red:1.2) <lora:x:unet=0.3>")
    assert text == "a cat ,  (red:1.2) "  # cut out, nothing else changed (A1111)
    refs = refs_from_tags(tags)
    # A1111: the first number is the text-encoder weight, the second the UNet's (default: the first)
    assert [(r.name, r.text_strength, r.strength) for r in refs] == [
        ("ink", 0.5, 0.5),
        ("sub/hat", 0.4, 0.9),
        ("x", 1.0, 0.3),
    ]


def test_family_guess_from_cross_attention_width(tmp_path):
    from latentforge.adapters.lora import guess_family, read_lora

    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl-base")):
        key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        path = tmp_path / f"{width}.safetensors"
        save_file(
            {f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(640, 4)}, path
        )
        assert guess_family(read_lora(path)) == family


def test_lokr_and_tucker_loha_on_convolutions(sd1, tmp_path):
    _, ours, _ = sd1
    g = torch.Generator().manual_seed(16)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    lokr_conv, loha_conv = "input_blocks.1.0.out_layers.3", "input_blocks.2.0.in_layers.2"  # 32 -> 32, 3x3
    lokr = {"lokr_w1": r(4, 2), "lokr_w2": r(8, 16, 3, 3)}  # both whole: no alpha scale
    t1, t2 = r(4, 4, 3, 3), r(4, 4, 3, 3)
    loha = {"hada_w1_a": r(4, 32), "hada_w1_b": r(4, 32), "hada_w2_a": r(4, 32), "hada_w2_b": r(4, 32)}
    loha |= {"hada_t1": t1, "hada_t2": t2}
    sd = {}
    for module, parts in ((lokr_conv, lokr), (loha_conv, loha)):
        key = "lora_unet_" + module.replace(".", "_")
        sd |= {f"{key}.{p}": t for p, t in parts.items()}
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(sd, tmp_path / "conv.safetensors")
    W = {m: ours.unet.get_parameter(m + ".weight").detach().clone() for m in (lokr_conv, loha_conv)}
    ours.apply_lora(tmp_path / "conv.safetensors")
    try:
        got = {m: ours.unet.get_parameter(m + ".weight").detach() - W[m] for m in W}
    finally:
        ours.remove_lora("conv")
    # Kronecker product of a [4, 2] matrix and [8, 16, 3, 3] kernels: block (i, j) is w1[i, j] * w2
    expected = torch.zeros(32, 32, 3, 3)
    for i in range(4):
        for j in range(2):
            expected[i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16] = lokr["lokr_w1"][i, j] * lokr["lokr_w2"]
    torch.testing.assert_close(got[lokr_conv], expected)

    # Tucker LoHa: each factor is, per kernel position, a^T t[:, :, k, l] b; their product times alpha / rank
    def tucker(t, a, b):
        out = torch.zeros(32, 32, 3, 3)
        for k in range(3):
            for m in range(3):
                out[:, :, k, m] = a.T @ t[:, :, k, m] @ b
        return out

    w1 = tucker(t1, loha["hada_w1_a"], loha["hada_w1_b"])
    w2 = tucker(t2, loha["hada_w2_a"], loha["hada_w2_b"])
    torch.testing.assert_close(got[loha_conv], w1 * w2 * (2.0 / 4), atol=1e-5, rtol=1e-4)


def test_damaged_lora_factors_are_refused_and_change_nothing(sd1, tmp_path):
    _, ours, _ = sd1
    original = _pipe_state(ours)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    other = "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k"
    w = ours.unet.get_parameter("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    out, width = w.shape

    def good(n: str) -> dict[str, torch.Tensor]:
        return {f"{n}.lora_down.weight": torch.ones(4, width), f"{n}.lora_up.weight": torch.ones(out, 4)}

    cases = {
        "nan": ({**good(name), f"{name}.lora_down.weight": torch.full((4, width), float("nan"))}, "holds NaN or Inf"),
        "alpha": ({**good(name), f"{name}.alpha": torch.ones(3)}, r"\.alpha' has shape \[3\]; an alpha is one number"),
        "flat": ({f"{name}.lora_down.weight": torch.ones(4), f"{name}.lora_up.weight": torch.ones(4)}, "does not fit"),
        "nodown": ({f"{name}.lora_up.weight": torch.ones(out, 4)}, "it has no 'down' factor"),
        # the bad module comes second: the first must not stay applied
        "dora": ({**good(other), **good(name), f"{name}.dora_scale": torch.ones(7)}, f"{name} does not fit"),
    }
    for case, (sd, message) in cases.items():
        save_file(sd, tmp_path / f"{case}.safetensors")
        with pytest.raises(LoraError, match=rf"{case}\.safetensors: .*{message}"):
            ours.apply_lora(tmp_path / f"{case}.safetensors")
    after = _pipe_state(ours)
    assert ours.patcher.sources == [] and all(torch.equal(original[k], after[k]) for k in original)


def test_prompt_tags_find_a_lora_by_its_alias_as_a1111(sd1, tmp_path):
    """A1111 (networks.load_networks): a name that is no file stem is looked up among the aliases, each file's
    ``ss_output_name`` metadata; A1111 writes aliases into prompts by default, so infotexts carry them."""
    ref, ours, _ = sd1
    folder = tmp_path / "aliased"
    folder.mkdir()
    sd = kohya_and_peft(ref, ours, "kohya-diffusers", seed=11)
    save_file(sd, folder / "ink_style_v2-000010.safetensors", metadata={"ss_output_name": "inkstyle"})
    ours.folders.lora = [folder]
    options = dict(steps=2, width=64, height=64, seed=5, sampler="Euler")
    by_alias = ours.txt2img("a red circle <lora:inkstyle:0.7>", **options)
    by_stem = ours.txt2img("a red circle <lora:ink_style_v2-000010:0.7>", **options)
    assert by_alias.images[0].tobytes() == by_stem.images[0].tobytes()
    assert by_alias.images[0].tobytes() != ours.txt2img("a red circle", **options).images[0].tobytes()
    with pytest.raises(Exception, match="LoRA 'nostyle' is not in"):  # AdapterNotFound or RequestError
        ours.txt2img("a red circle <lora:nostyle:0.7>", **options)
