"""ControlNet training (diffusers' examples/controlnet recipe) on a tiny SD1 model: the start is the UNet's
encoder copied with zero convolutions (checked against diffusers' own weights and the plain UNet's output),
the loss goes down, the file loads through our loader and into diffusers' ControlNetModel with the same
residuals, resume is exact, and bad folders are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

import latentforge
from latentforge.adapters.controlnet import load_controlnet
from latentforge.convert.diffusers import unet_key
from latentforge.sampling import ModelDenoiser
from latentforge.train import ConfigError, load_config, train
from latentforge.train.common import deterministic_generator
from latentforge.train.controlnet import ControlNetTraining, load_control_data
from latentforge.train.data import DataError
from latentforge.train.diffusion import _trainables, diffusion_loss, encode_images
from test_controlnet import _original_layout
from tiny import close, quiet_train_config, tiny_sd1_file

CORNERS = [(8, 8), (40, 8), (8, 40), (40, 40)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD1 model and a folder of triples: a grey square at one of four corners, the control image
    a white square on black at the same place, one caption for all (only the control tells where)."""
    tmp = tmp_path_factory.mktemp("tcn")
    ref, path = tiny_sd1_file(tmp, seed=61)
    data = tmp / "data"
    (data / "conditioning").mkdir(parents=True)
    for i, (x, y) in enumerate(CORNERS * 2):
        image = Image.new("RGB", (64, 64), (30, 60, 200) if i < 4 else (200, 60, 30))
        ImageDraw.Draw(image).rectangle((x, y, x + 15, y + 15), fill=(240, 240, 240))
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a white square")
        hint = Image.new("RGB", (64, 64))
        ImageDraw.Draw(hint).rectangle((x, y, x + 15, y + 15), fill=(255, 255, 255))
        hint.save(data / "conditioning" / f"{i}.png")
    return ref, path, data, tmp


def _cfg(out, base_file, data, *extra):
    overrides = [f'data.path="{data}"', "batch_size=4", "lr=2e-3", "ema_decay=0", "model.caption_dropout=0"]
    return quiet_train_config(out, base_file, 'mode="controlnet"', *overrides, *extra)


def test_initial_controlnet_is_the_unets_encoder_with_zero_convolutions(base):
    ref, base_file, data, tmp = base
    cfg = _cfg(tmp / "init", base_file, data)
    pipe = latentforge.load(base_file)
    net = ControlNetTraining(pipe, cfg).net
    theirs = ref.unet.state_dict()  # diffusers' weights: an independent source for the copied encoder
    copied = 0
    for k, v in net.state_dict().items():
        if k.startswith(("input_blocks.", "middle_block.", "time_embed.")):
            assert torch.equal(v, theirs[unet_key(k, 2)]), k
            copied += 1
        elif k.startswith(("zero_convs.", "middle_block_out.")) or k.startswith("input_hint_block.14."):
            assert not v.any(), k
    assert copied > 100 and len(net.zero_convs) == 12
    # so the controlled UNet starts as the plain one
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g), torch.rand(2, 3, 64, 64)
    t = torch.tensor([50.0, 800.0])
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ctx, control=net(x, t, ctx, hint)), pipe.unet(x, t, ctx))


def _loss(pipe, cfg, net, latents, hints, captions) -> float:
    denoiser = ModelDenoiser(pipe.unet, pipe.noise_schedule(), pipe.prediction)
    total = 0.0
    with torch.no_grad():
        for k in range(6):
            h = hints.float() / 255

            def control(x, t, cond, h=h):
                return net(x, t, cond.context, h)

            g = deterministic_generator(99, k)
            total += float(diffusion_loss(pipe, denoiser, latents, captions, g, cfg, None, control=control))
    return total / 6


def test_training_lowers_the_loss_and_the_file_loads_in_both_loaders(base):
    ref, base_file, data, tmp = base
    cfg = _cfg(tmp / "run", base_file, data, "steps=40")
    pipe = latentforge.load(base_file)
    images, hints, captions = load_control_data(cfg)
    assert len(captions) == 8 and hints.shape == images.shape == (8, 3, 64, 64)
    latents = encode_images(pipe, images)
    before = _loss(pipe, cfg, ControlNetTraining(pipe, cfg).net, latents, hints, captions)
    path = train(cfg)
    assert path.name == "controlnet.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("control_model.") for k in keys) and "control_model.zero_convs.11.0.weight" in keys
    assert meta["latentforge.kind"] == "controlnet" and meta["latentforge.steps"] == "40"
    assert json.loads(meta["latentforge.hint_widths"]) == [16, 32, 96, 256]  # the original's, for an 8x VAE
    ours = load_controlnet(path, pipe.unet.config)
    after = _loss(pipe, cfg, ours, latents, hints, captions)
    assert after < 0.9 * before, (before, after)
    frozen = latentforge.load(base_file)  # what the run trains: only the ControlNet, every network frozen
    modules, _ = _trainables(cfg, frozen)
    assert list(modules) == ["controlnet"]
    assert not any(p.requires_grad for net in frozen.networks().values() for p in net.parameters())

    # diffusers' ControlNetModel of the same structure, filled from the file through the test's own
    # name table (test_controlnet._original_layout, written from the layout's description)
    theirs = ControlNetModel.from_unet(ref.unet)
    table = {(v.data_ptr(), v.shape): name for name, v in _original_layout(theirs, 4, 2).items()}
    saved = load_file(str(path))
    state = {k: saved[table[v.data_ptr(), v.shape]] for k, v in theirs.state_dict().items()}
    assert len(state) == len(saved)
    theirs.load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g), torch.rand(2, 3, 64, 64)
    t = torch.tensor([300.0, 20.0])
    with torch.no_grad():
        down, mid = theirs.eval()(x, t, ctx, hint, return_dict=False)
        res = ours(x, t, ctx, hint)
    assert any(float(r.abs().max()) > 1e-4 for r in res.output)  # trained: the residuals are no longer zero
    for a, b in [*zip(res.output, down), (res.middle, mid)]:
        ok, diff, scale = close(a, b)
        assert ok, (diff, scale)


def test_resume_equals_an_uninterrupted_run(base):
    _ref, base_file, data, tmp = base
    straight = train(_cfg(tmp / "straight", base_file, data, "steps=6", "model.caption_dropout=0.5"))
    cfg = _cfg(tmp / "resumed", base_file, data, "steps=6", "model.caption_dropout=0.5", "save_every=3")
    train(cfg, stop_after=3)
    resumed = train(cfg)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_folders_are_refused_by_name(base, tmp_path):
    _ref, base_file, data, _tmp = base
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    (folder / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="conditioning"):
        load_control_data(_cfg(tmp_path / "o", base_file, folder))
    (folder / "conditioning").mkdir()
    with pytest.raises(DataError, match=r"a\.png: no control image"):
        load_control_data(_cfg(tmp_path / "o", base_file, folder, 'data.on_bad="error"'))
    with pytest.raises(DataError, match="no usable image / control image / caption"):
        load_control_data(_cfg(tmp_path / "o", base_file, folder))
    with pytest.raises(ConfigError, match=r"needs model\.base"):
        load_config(None, ['mode="controlnet"', f'data.path="{data}"'])
