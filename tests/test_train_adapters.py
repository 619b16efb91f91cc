"""Adapter training: LoRA (kohya files that diffusers and our loader read alike) and textual inversion
(A1111 files that diffusers' load_textual_inversion reads), exact resume, kohya's caption options, errors."""

from __future__ import annotations

import copy
import json

import diffusers as D
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import latentforge
from latentforge.adapters.lora import apply_lora
from latentforge.sampling import ModelDenoiser
from latentforge.train import ConfigError, load_config, train
from latentforge.train.common import deterministic_generator
from latentforge.train.data import load_folder, shuffle_tags
from latentforge.train.diffusion import diffusion_loss, encode_images
from latentforge.train.lora import build_network
from test_lora import _unet_io
from tiny import build_reference, close, hf_tokenizer, quiet_train_config, save_folder, tiny_sd1_file

COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "yellow": (230, 230, 30)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD1 model (diffusers reference + our single file) and a small captioned folder."""
    tmp = tmp_path_factory.mktemp("ta")
    ref, path = tiny_sd1_file(tmp, seed=51)
    data = tmp / "data"
    data.mkdir()
    for i, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (64, 64), colour)
        image.paste((255, 255, 255), (16 + 4 * i, 16, 40, 48))
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"{name} square, plain, picture")
    return ref, path, data, tmp


def _cfg(out, base_file, data, *extra):
    overrides = [f'data.path="{data}"', "batch_size=4", "lr=1e-2", "ema_decay=0", "model.caption_dropout=0"]
    return quiet_train_config(out, base_file, *overrides, *extra)


def _loss(pipe, cfg, data_latents, captions) -> float:
    denoiser = ModelDenoiser(pipe.unet, pipe.noise_schedule(), pipe.prediction)
    with torch.no_grad():
        losses = [
            float(diffusion_loss(pipe, denoiser, data_latents, captions, deterministic_generator(77, k), cfg, None))
            for k in range(4)
        ]
    return sum(losses) / len(losses)


def _data(pipe, cfg):
    from latentforge.train.data import load_dataset

    images, captions, _ = load_dataset(cfg.data)
    return encode_images(pipe, images), captions


def _unet_out(pipe, g):
    width = pipe.unet.config.context_dim
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([100.0, 700.0]),
        torch.randn(2, 77, width, generator=g),
    )
    with torch.no_grad():
        return pipe.unet(x, t, ctx)


def test_lora_training_lowers_the_loss_and_writes_a_kohya_file(base):
    _ref, base_file, data, tmp = base
    cfg = _cfg(tmp / "lora", base_file, data, 'mode="lora"', "steps=30", "lora.rank=4", "lora.alpha=4",
               'lora.modules="locon"', "lora.text_encoder=true")  # fmt: skip
    pipe = latentforge.load(base_file)
    latents, captions = _data(pipe, cfg)
    before = _loss(pipe, cfg, latents, captions)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = train(cfg)
    assert path.name == "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert json.loads(meta["ss_tag_frequency"])["data"]["plain"] == 4
    # kohya's names: diffusers UNet paths for SD1, lora_te_ + the Hugging Face path
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys  # LoCon
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    apply_lora(pipe, path)
    after = _loss(pipe, cfg, latents, captions)
    assert after < 0.8 * before, (before, after)
    pipe.patcher.remove(f"lora:{path.stem}")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in weights.items())  # base was frozen


def test_trained_lora_loads_in_diffusers_and_ours_alike(base):
    ref, base_file, data, tmp = base
    cfg = _cfg(tmp / "lora2", base_file, data, 'mode="lora"', "steps=3", "lora.rank=2", "lora.alpha=1",
               "lora.text_encoder=true")  # fmt: skip
    path = train(cfg)
    tensors = load_file(path)
    # the trained modules' own forward (factors as parametrizations) ...
    pipe = latentforge.load(base_file)
    net = build_network(pipe, cfg.lora)
    for name, f in net.factors.items():
        f.down.data.copy_(tensors[f"{name}.lora_down.weight"])
        f.up.data.copy_(tensors[f"{name}.lora_up.weight"])
    # it trained (all but the middle block's self-attention q/k: one latent position there, no gradient)
    assert sum(bool(f.up.abs().sum() == 0) for f in net.factors.values()) <= 2
    untrained = _unet_out(pipe, torch.Generator().manual_seed(0))
    net.attach()
    net.eval()
    trained = _unet_out(pipe, torch.Generator().manual_seed(0))
    ids = torch.randint(0, 49000, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained_text = pipe.text_encoders[0](ids).hidden
    net.detach_from_model()
    # ... equal our loader's merge
    apply_lora(pipe, path)
    ours = _unet_out(pipe, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=1e-4)
    assert not close(ours, untrained)[0]  # the LoRA changes the output (so the comparisons can fail)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoders[0](ids).hidden, trained_text, atol=1e-5, rtol=1e-4)
    # and diffusers' kohya loader
    unet, enc = copy.deepcopy(ref.unet), copy.deepcopy(ref.text_encoders[0])
    dpipe = D.StableDiffusionPipeline(
        ref.vae, enc, hf_tokenizer("<|endoftext|>", tmp / "tok"), unet, D.EulerDiscreteScheduler(), None, None,
        requires_safety_checker=False,
    )  # fmt: skip
    dpipe.load_lora_weights(str(path))
    dpipe.fuse_lora(lora_scale=1.0)
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([100.0, 700.0]),
        torch.randn(2, 77, width, generator=g),
    )
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=ctx).sample
        ok, diff, scale = close(ours, theirs)
        assert ok, f"UNet with the trained LoRA: max diff {diff:.3g} vs {scale:.3g}"
        ok, diff, scale = close(trained_text, enc(ids).last_hidden_state)
        assert ok, f"text encoder with the trained LoRA: max diff {diff:.3g} vs {scale:.3g}"


def test_lora_resume_equals_an_uninterrupted_run(base):
    _ref, base_file, data, tmp = base
    extra = ('mode="lora"', "steps=6", "grad_accum=2", "batch_size=2", "lora.dropout=0.3", "data.shuffle_tags=true",
             "data.keep_tokens=1", "model.noise_offset=0.1", "model.caption_dropout=0.2")  # fmt: skip
    full = train(_cfg(tmp / "ra", base_file, data, *extra))
    interrupted = _cfg(tmp / "rb", base_file, data, *extra)
    train(interrupted, stop_after=3)
    assert not (tmp / "rb" / "lora.safetensors").exists()
    resumed = train(interrupted)
    a, b = load_file(full), load_file(resumed)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_training_learns_a_concept_on_the_demo_model(tmp_path):
    """The trained demo model knows "a red circle on a blue background"; a new token trained on such
    images (captions "[name]") must bring the loss most of the way from the untrained word to that caption."""
    from PIL import ImageDraw

    from latentforge.demo import bundled_model_path

    base_file = bundled_model_path()
    if base_file is None:
        pytest.skip("no bundled demo model in this installation")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        image = Image.new("RGB", (64, 64), (30, 30, 220))
        ImageDraw.Draw(image).ellipse((8 + 8 * i, 16, 36 + 8 * i, 44), fill=(220, 30, 30))
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("[name]")
    cfg = _cfg(tmp_path / "emb", base_file, data, 'mode="embedding"', "steps=20", "lr=5e-2",
               'embedding.token="sqr"', 'embedding.init_text="thing"', "embedding.num_vectors=2")  # fmt: skip
    pipe = latentforge.load(base_file, dtype=torch.float32)
    latents, _ = _data(pipe, cfg)
    before = _loss(pipe, cfg, latents, ["sqr"] * 4)  # an ordinary (meaningless) word before training
    known = _loss(pipe, cfg, latents, ["a red circle on a blue background"] * 4)
    weights = {k: v.clone() for k, v in pipe.text_encoders[0].state_dict().items()}
    path = train(cfg)
    assert path == tmp_path / "emb" / "sqr.safetensors"
    pipe.text.embeddings.add(path)
    after = _loss(pipe, cfg, latents, ["sqr"] * 4)
    # measured: before 0.177, after 0.089, the known caption 0.072
    assert after < known + 0.3 * (before - known), (before, after, known)
    assert all(torch.equal(v, pipe.text_encoders[0].state_dict()[k]) for k, v in weights.items())


def test_trained_embedding_files_load_in_diffusers_and_ours_alike(base):
    ref, base_file, data, tmp = base
    cfg = _cfg(tmp / "emb", base_file, data, 'mode="embedding"', "steps=3", "lr=5e-2",
               'embedding.token="sqr"', 'embedding.init_text="square thing"', "embedding.num_vectors=3")  # fmt: skip
    pipe = latentforge.load(base_file)
    init = pipe.text.encoders[0].embeddings.token_embedding.weight[pipe.text.tokenizers[0].encode("square thing")]
    path = train(cfg)
    pt = torch.load(path.with_suffix(".pt"), weights_only=True)
    vectors = pt["string_to_param"]["*"]
    assert vectors.shape == (3, 128) and pt["name"] == "sqr" and pt["step"] == 3
    torch.testing.assert_close(load_file(path)["emb_params"], vectors)
    assert not torch.equal(vectors, init[[0, 0, 1]].detach())  # trained away from the initialisation
    pipe.text.embeddings.add(path)
    dpipe = D.StableDiffusionPipeline(
        ref.vae, copy.deepcopy(ref.text_encoders[0]), hf_tokenizer("<|endoftext|>", tmp / "tok2"), ref.unet,
        D.EulerDiscreteScheduler(), None, None, requires_safety_checker=False,
    )  # fmt: skip
    dpipe.load_textual_inversion(str(path.with_suffix(".pt")), token="sqr")
    with torch.no_grad():
        theirs = dpipe.encode_prompt("a sqr on a table", "cpu", 1, False)[0]
    ok, diff, scale = close(pipe.encode_prompt("a sqr on a table").context, theirs)
    assert ok, f"context with the trained embedding: max diff {diff:.3g} vs {scale:.3g}"


def test_embedding_initialisation_follows_a1111(base):
    from latentforge.train.embedding import EmbeddingVectors

    _ref, base_file, data, tmp = base
    pipe = latentforge.load(base_file)
    cfg = _cfg(tmp / "e0", base_file, data, 'mode="embedding"', 'embedding.token="x"',
               'embedding.init_text="red blue"', "embedding.num_vectors=4")  # fmt: skip
    vec = EmbeddingVectors(pipe, cfg.embedding)
    table = pipe.text.encoders[0].embeddings.token_embedding.weight
    ids = pipe.text.tokenizers[0].encode("red blue")
    expected = table[[ids[0], ids[0], ids[1], ids[1]]]  # i * 2 // 4 for i = 0..3
    torch.testing.assert_close(vec.params["vectors"].detach(), expected.detach())
    assert vec.caption("a [name] photo") == "a x photo" and vec.caption("red") == "x, red"


def test_tag_shuffling_keeps_the_leading_tags():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = shuffle_tags("me, hat, red, blue, green", 2, g).split(", ")
        assert out[:2] == ["me", "hat"] and sorted(out[2:]) == ["blue", "green", "red"]
        seen.add(tuple(out))
    assert len(seen) > 1


def test_bad_inputs_are_config_errors(base, tmp_path):
    _ref, base_file, data, _tmp = base
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no usable images"):
        train(_cfg(tmp_path / "a", base_file, empty, 'mode="lora"', "steps=1"))
    with pytest.raises(ConfigError, match=r"lora\.rank = 64 is larger than layer unet\..*allows"):
        train(_cfg(tmp_path / "b", base_file, data, 'mode="lora"', "steps=1", "lora.rank=64"))
    with pytest.raises(ConfigError, match=r"lora\.modules must be one of attention, attention_ff, locon"):
        _cfg(tmp_path / "c", base_file, data, 'mode="lora"', 'lora.modules="everything"')
    with pytest.raises(ConfigError, match=r"embedding\.token"):
        _cfg(tmp_path / "d", base_file, data, 'mode="embedding"')
    with pytest.raises(ConfigError, match=r"needs model\.base"):
        load_config(None, ['mode="lora"', f'data.path="{data}"'])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tx")
    ref = build_reference("sdxl-base", seed=52)
    pipe = latentforge.load(save_folder(ref, tmp / "m"))
    return ref, pipe, pipe.save(tmp / "sdxl.safetensors")


def test_sdxl_lora_uses_original_names_and_loads_in_diffusers(base, sdxl, tmp_path):
    ref, pipe, base_file = sdxl
    _, _, data, _ = base
    cfg = _cfg(tmp_path / "l", base_file, data, 'mode="lora"', "steps=2", "batch_size=2", "lora.rank=2",
               'lora.modules="attention"', "lora.text_encoder=true")  # fmt: skip
    path = train(cfg)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") and "_attn2_to_k." in k for k in keys)
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert not any("ff_net" in k or "proj_in" in k for k in keys)  # "attention": attn1/attn2 only
    unet = copy.deepcopy(ref.unet)
    toks = [hf_tokenizer(p, tmp_path / f"tok{i}") for i, p in enumerate(ref.spec.pads)]
    encs = [copy.deepcopy(e) for e in ref.text_encoders]
    dpipe = D.StableDiffusionXLPipeline(ref.vae, encs[0], encs[1], toks[0], toks[1], unet, D.EulerDiscreteScheduler())
    dpipe.load_lora_weights(str(path))
    dpipe.fuse_lora(lora_scale=1.0)
    apply_lora(pipe, path)
    try:
        ids = torch.randint(0, 49000, (1, 77), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for ours, theirs in zip(pipe.text_encoders, encs):
                ok, diff, scale = close(ours(ids).hidden, theirs(ids).last_hidden_state)
                assert ok, f"SDXL text encoder with the trained LoRA: max diff {diff:.3g} vs {scale:.3g}"
        x, t, ctx, kwargs, y = _unet_io(ref, torch.Generator().manual_seed(3), sdxl=True)
        with torch.no_grad():
            ok, diff, scale = close(pipe.unet(x, t, ctx, y), unet(x, t, encoder_hidden_states=ctx, **kwargs).sample)
        assert ok, f"SDXL UNet with the trained LoRA: max diff {diff:.3g} vs {scale:.3g}"
        with torch.no_grad():  # diffusers did apply the file (so the comparison can fail)
            fused = unet(x, t, encoder_hidden_states=ctx, **kwargs).sample
            assert not close(fused, ref.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample)[0]
    finally:
        pipe.patcher.remove(f"lora:{path.stem}")


def test_sdxl_embedding_is_a_clip_l_clip_g_pair(tmp_path, base, sdxl):
    from latentforge.conditioning.embeddings import read_embedding

    _, _, data, _ = base
    _, pipe, base_file = sdxl
    cfg = _cfg(tmp_path / "e", base_file, data, 'mode="embedding"', "steps=2", "batch_size=2",
               'embedding.token="sqr"', "embedding.num_vectors=2")  # fmt: skip
    path = train(cfg)
    tensors = load_file(path)
    widths = [enc.config.width for enc in pipe.text_encoders]
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, widths[0]), "clip_g": (2, widths[1])}
    pt = torch.load(path.with_suffix(".pt"), weights_only=True)
    assert set(pt) == {"clip_l", "clip_g"} and torch.equal(pt["clip_g"], tensors["clip_g"])
    emb = read_embedding(path)
    assert emb.for_encoders(pipe.text.slots) is not None
    plain = pipe.encode_prompt("a sqr").context
    pipe.text.embeddings.add(path)
    assert not torch.equal(pipe.encode_prompt("a sqr").context, plain)


def test_buckets_are_kohyas():
    from latentforge.train.data import bucket_sizes, nearest_bucket

    sizes = bucket_sizes(512, 64)
    # sd-scripts' buckets for 512 (min 256, max 1024, step 64): h = floor(512^2 / w / 64) * 64, both ways
    for expected in [(512, 512), (448, 576), (576, 448), (384, 640), (320, 768), (768, 320), (256, 1024), (832, 256)]:
        assert expected in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and min(w, h) >= 256 for w, h in sizes)
    # 13 widths 256..1024 give 13 buckets; their transposes add only (320, 704) and (256, 832/896/960)
    assert len(sizes) == 17
    assert nearest_bucket(1920, 1080, sizes) == (640, 384)  # 16:9 -> log-nearest ratio 5:3
    assert nearest_bucket(100, 100, sizes) == (512, 512)


def test_bucketed_training_batches_one_size_and_resumes_exactly(base, tmp_path):
    from latentforge.train.data import bucket_batch

    _, base_file, _, _ = base
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(128, 64), (130, 62), (64, 128), (96, 96), (100, 90)]):
        Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    shapes = [(4, 8, 24), (4, 8, 24), (4, 24, 8), (4, 16, 16), (4, 16, 16)]  # latents of 192x64, 64x192, 128x128
    seen = []
    for k in range(3):  # one epoch: 3 batches of at most 2, each of one shape
        idx = bucket_batch(shapes, 2, 0, k).tolist()
        assert len({shapes[i] for i in idx}) == 1
        seen += idx
    assert sorted(seen) == [0, 1, 2, 3, 4]
    extra = ('mode="lora"', "steps=4", "batch_size=2", "data.buckets=true", "data.resolution=128")
    images = load_folder(_cfg(tmp_path / "x", base_file, data, *extra).data)[0]
    # 2:1 goes to 192x64 (ratio 3: log-nearer than 1 or 4), 1:2 to 64x192, near-square to 128x128
    assert [tuple(im.shape[1:]) for im in images] == [(64, 192), (64, 192), (192, 64), (128, 128), (128, 128)]
    full = train(_cfg(tmp_path / "a", base_file, data, *extra))
    interrupted = _cfg(tmp_path / "b", base_file, data, *extra)
    train(interrupted, stop_after=2)
    a, b = load_file(full), load_file(train(interrupted))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"data\.buckets needs"):
        _cfg(tmp_path / "c", base_file, data, 'mode="vae"', "data.buckets=true")
