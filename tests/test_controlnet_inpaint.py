"""ControlNet inpaint units (control_v11p_sd15_inpaint) as the A1111 ControlNet extension runs them: the hint
is the image over 255 with the masked pixels at -1 (diffusers' ``make_inpaint_condition``), and our network
given it matches diffusers' ControlNetModel; the server takes the extension's mask forms within its budget."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.adapters.controlnet import ControlledDenoiser, load_controlnet
from latentforge.convert.diffusers import unet_config_from_diffusers
from latentforge.pipelines import control
from latentforge.pipelines.request import RequestError
from serverproc import Server
from serverproc import b64_png as _b64
from tiny import build_reference, close, diffusers_controlnet, save_folder, write_demo_controlnet


def _image(size: int = 64, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _mask(size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[16:40, 8:48] = 255
    m[0:4, 0:4] = 127  # not masked: the extension's threshold is > 127
    m[60:, 60:] = 128  # masked
    return m


def _make_inpaint_condition(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """diffusers' ``make_inpaint_condition`` (its docs): image / 255 with the masked pixels (> 0.5) at -1."""
    x = image.astype(np.float32) / 255.0
    x[mask.astype(np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn_inpaint")
    ref = build_reference("sd1")
    net, path = diffusers_controlnet(ref, tmp)
    ours = latentforge.load(save_folder(ref, tmp / "m"))
    return ref, net, ours, path


def _plan(ours, unit, **request):
    from latentforge.pipelines.generate import build_plan
    from latentforge.pipelines.request import GenerationRequest

    req = GenerationRequest.from_dict(dict(prompt="x", steps=2, width=64, height=64, control=[unit], **request))
    units = control.prepare(ours, req)
    with torch.inference_mode():
        plan = build_plan(ours, req, None)
        control.apply(plan, ours, units)
    return plan


@pytest.mark.parametrize("form", ["dict", "pair"])
def test_hint_is_make_inpaint_condition_and_residuals_equal_diffusers(e2e, form):
    ref, net, ours, path = e2e
    image, mask = _image(), _mask()
    value = {"image": Image.fromarray(image), "mask": Image.fromarray(mask)}
    if form == "pair":
        value = (value["image"], value["mask"])
    plan = _plan(ours, dict(model=str(path), image=value, module="inpaint_global_harmonious"))
    model = plan.passes[0].model
    assert isinstance(model, ControlledDenoiser)
    hint = model.units[0].hint.float()
    expected = _make_inpaint_condition(image, mask)
    assert torch.equal(hint, expected)
    assert (hint == -1).sum() == 3 * (mask > 127).sum()
    # our network given that hint = diffusers' ControlNetModel with the same weights
    theirs = load_controlnet(path, unet_config_from_diffusers(dict(ref.unet.config)))
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.tensor([700.0])
    with torch.no_grad():
        down, mid = net(x, t, ctx, expected, return_dict=False)
        res = theirs(x, t, ctx, hint)
    for a, b in zip([*res.output, res.middle], [*down, mid]):
        ok, diff, scale = close(a, b)
        assert ok, (diff, scale)


def test_hint_resize_modes_as_the_extension():
    image, mask = _image(32), _mask(32)
    # Just Resize at twice the size (many colours: cubic), the mask thresholded after the resize
    hint = control.inpaint_hint(control.inpaint_feed(image, mask, 64, 64, 0))
    assert hint.shape == (1, 3, 64, 64)
    import cv2

    rgba = cv2.resize(np.dstack([image, mask]).astype(np.float32), (64, 64), interpolation=cv2.INTER_CUBIC)
    m = rgba[:, :, 3] > 127
    expected = rgba[:, :, :3] / 255.0
    expected[m] = -1.0
    assert torch.allclose(hint[0].permute(1, 2, 0), torch.from_numpy(expected).float(), atol=1e-6)
    # Resize and Fill: the pad is masked (-1), outpainting
    filled = control.inpaint_hint(control.inpaint_feed(image, None, 64, 32, 2))
    assert (filled[..., :16] == -1).all() and (filled[..., 48:] == -1).all()
    assert (filled[..., 16:48] >= 0).all()
    # no mask: the image as a plain hint
    plain = control.inpaint_hint(control.inpaint_feed(image, None, 32, 32, 1))
    assert torch.equal(plain, torch.from_numpy(image / 255.0).float().permute(2, 0, 1)[None])


def test_inpaint_unit_changes_the_image_and_its_mask_matters(e2e):
    _, _, ours, path = e2e
    image, mask = Image.fromarray(_image()), Image.fromarray(_mask())
    request = dict(steps=4, cfg_scale=5.0, width=64, height=64, seed=5, sampler="Euler")
    plain = np.asarray(ours.txt2img("a cube", **request).images[0], np.int16)
    unit = dict(model=str(path), module="inpaint_global_harmonious", weight=1.0)
    no_mask = ours.txt2img("a cube", **request, control=[{**unit, "image": image}])
    masked = ours.txt2img("a cube", **request, control=[{**unit, "image": {"image": image, "mask": mask}}])
    a, b = (np.asarray(r.images[0], np.int16) for r in (no_mask, masked))
    assert np.abs(a - plain).max() > 4 and np.abs(b - plain).max() > 4
    diff = np.abs(a - b).mean(axis=2)
    inside = _mask() > 127
    assert diff.max() > 0 and diff[inside].mean() > diff[~inside].mean()  # tiny random nets: small but there
    assert "Module: inpaint_global_harmonious" in masked.infotexts[0]
    assert "Processor Res: 0.5, Threshold A: 0.5, Threshold B: 0.5" in masked.infotexts[0]


def test_bad_masks_and_refused_modules(e2e, tmp_path):
    _, _, ours, path = e2e
    image = Image.fromarray(_image())
    unit = dict(model=str(path), module="inpaint")
    with pytest.raises(RequestError, match="mask is 32x32 but the unit's image is 64x64"):
        _plan(ours, {**unit, "image": {"image": image, "mask": Image.new("L", (32, 32))}})
    with pytest.raises(RequestError, match="mode 'CMYK'"):
        _plan(ours, {**unit, "image": {"image": image, "mask": Image.new("CMYK", (64, 64))}})
    with pytest.raises(RequestError, match="an image dict must be"):
        _plan(ours, {**unit, "image": {"img": image}})
    for module, why in (("inpaint_only+lama", "LaMa"),):
        with pytest.raises(RequestError, match=f"module '{re.escape(module)}' is not available.*{why}"):
            ours.txt2img("x", steps=1, width=64, height=64, control=[{**unit, "module": module, "image": image}])
    # an RGBA mask is composited over white first (the extension's HWC3): transparent = masked
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, 32:, 3] = 255
    got = control.read_inpaint_mask(Image.fromarray(rgba), (64, 64), "m")
    assert (got[:, :32] == 255).all() and (got[:, 32:] == 0).all()


# --- the A1111 API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn-inpaint-server")
    write_demo_controlnet(tmp / "cn" / "inp.safetensors")
    srv = Server("--controlnet-dir", str(tmp / "cn"), "--max-image-pixels", str(256 * 256), tmp=tmp)
    yield srv
    srv.close()


def _txt2img(server, units):
    body = {"prompt": "a red circle", "steps": 3, "seed": 3, "width": 64, "height": 64, "cfg_scale": 4}
    body["alwayson_scripts"] = {"controlnet": {"args": units}}
    return server.post("/sdapi/v1/txt2img", json=body)


def _pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))


def test_server_inpaint_units(server):
    image, mask = _b64(Image.fromarray(_image())), _b64(Image.fromarray(_mask()))
    unit = {"model": "inp", "module": "inpaint_global_harmonious", "weight": 1.0}
    flat = _pixels(_txt2img(server, [{**unit, "image": image, "mask": mask}]))
    nested = _pixels(_txt2img(server, [{**unit, "image": {"image": image, "mask": mask}}]))
    alias = _pixels(_txt2img(server, [{**unit, "input_image": image, "mask_image": mask, "module": "inpaint"}]))
    pair = _pixels(_txt2img(server, [{**unit, "image": [image, mask]}]))  # the extension's [image, mask]
    assert np.array_equal(flat, nested) and np.array_equal(flat, alias) and np.array_equal(flat, pair)
    for twice in (
        {"image": image, "mask": mask, "mask_image": mask},
        {"image": {"image": image, "mask": mask}, "mask": mask},
    ):
        r = _txt2img(server, [{**unit, **twice}])
        assert r.status_code == 400 and "args[0].mask" in r.text, r.text
    unmasked = _pixels(_txt2img(server, [{**unit, "image": image}]))
    assert not np.array_equal(flat, unmasked)
    r = _txt2img(server, [{**unit, "image": image, "mask": mask}])
    assert "Module: inpaint_global_harmonious" in r.json()["info"]
    # refused: unknown and unavailable modules, a mask on a unit that is not inpaint
    for module, field in (("inpaint_only+lama", ".module"), ("inpaint_magic", "module")):
        r = _txt2img(server, [{**unit, "module": module, "image": image, "mask": mask}])
        assert r.status_code == 400 and field in r.text and module in r.text, r.text
    r = _txt2img(server, [{**unit, "module": "canny", "image": image, "mask": mask}])
    assert r.status_code == 400 and "args[0].mask" in r.text and "inpaint mask is not available" in r.text


def test_server_hostile_masks(server):
    image = _b64(Image.fromarray(_image()))
    unit = {"model": "inp", "module": "inpaint", "image": image}
    cases = {
        "wrong size": (_b64(Image.new("L", (32, 64))), "the mask is 32x64 but the image is 64x64"),
        "other mode": (_b64(Image.new("I;16", (64, 64))), "mode"),
        "huge": (_b64(Image.new("1", (4000, 4000))), "at most 65536 pixels"),
        "not an image": ("bm90IGFuIGltYWdl", "not an image"),
    }
    for name, (mask, message) in cases.items():
        r = _txt2img(server, [{**unit, "mask": mask}])
        assert r.status_code == 400 and "args[0].mask" in r.text and message in r.text, (name, r.text)


def _img2img_plan(ours, unit, init: Image.Image, **request):
    from latentforge.pipelines.generate import build_plan
    from latentforge.pipelines.request import GenerationRequest

    req = GenerationRequest.from_dict(dict(prompt="x", steps=2, width=64, height=64, control=[unit], **request))
    req.validate(img2img=True)
    units = control.prepare(ours, req, [init])
    with torch.inference_mode():
        plan = build_plan(ours, req, [init])
        control.apply(plan, ours, units)
    return plan


def test_a_unit_without_image_takes_the_img2img_image_and_mask_as_the_extension(e2e):
    """sd-webui-controlnet's choose_input_image: with no unit image in img2img, the first init image (RGBA
    over white), img2img's resize mode, and for inpaint units A1111's mask through prepare_mask: grey,
    inverted with inpainting_mask_invert, blurred by mask_blur_x then mask_blur_y with cv2's Gaussian of
    kernel 2 * int(2.5 * blur + 0.5) + 1. Written out here from that description."""
    import cv2

    _, _, ours, path = e2e
    image, mask = _image(), _mask()
    init = Image.fromarray(image)
    plain = {"model": str(path), "module": "none"}
    wide = Image.fromarray(image[:48])  # 64x48: the resize modes differ

    def hint(unit, **request):
        return _img2img_plan(ours, unit, wide, **request).passes[0].model.units[0].hint

    fallback = hint(plain, resize_mode=2)  # img2img's Resize and fill
    assert torch.equal(fallback, hint({**plain, "image": wide, "resize_mode": 2}, resize_mode=0))
    assert not torch.equal(fallback, hint({**plain, "image": wide, "resize_mode": 1}, resize_mode=0))

    blurred = cv2.GaussianBlur(255 - mask, (2 * int(2.5 * 3 + 0.5) + 1, 1), 3)  # inverted, mask_blur_x 3
    blurred = cv2.GaussianBlur(blurred, (1, 2 * int(2.5 * 2 + 0.5) + 1), 2)  # mask_blur_y 2
    inpaint = {"model": str(path), "module": "inpaint_global_harmonious"}
    plan = _img2img_plan(
        ours,
        inpaint,
        init,
        mask=Image.fromarray(mask),
        mask_blur_x=3,
        mask_blur_y=2,
        inpainting_mask_invert=True,
        denoising_strength=0.5,
    )
    hints = [p.model.units[0].hint.float() for p in plan.passes if isinstance(p.model, ControlledDenoiser)]
    assert hints and torch.equal(hints[0], _make_inpaint_condition(image, blurred))
    with pytest.raises(RequestError, match="no control image"):
        _plan(ours, plain)  # txt2img has no init image to take


def test_cli_img2img_inpaint_unit_without_image_takes_the_init_image_and_mask(e2e, tmp_path):
    from latentforge.cli import main

    _, _, ours, path = e2e
    Image.fromarray(_image()).save(tmp_path / "in.png")
    Image.fromarray(_mask()).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    common = ["img2img", str(tmp_path / "in.png"), "x", "-m", ours.info.source, "--steps", "2", "--strength", "0.5"]
    unit = ["--control", str(path), "--control-module", "inpaint_global_harmonious"]
    assert main([*common, "--mask", str(tmp_path / "mask.png"), *unit, "-o", str(out)]) == 0
    assert "Module: inpaint_global_harmonious" in Image.open(out).info["parameters"]
    assert main(["txt2img", "x", "-m", ours.info.source, *unit, "-o", str(tmp_path / "t.png")]) == 2  # no image


def test_unit_inputs_refused_or_read_as_the_extension(e2e, tmp_path):
    """Review findings: outpainting grows the canvas the init image no longer covers; an
    inpainting model with an inpaint unit; more units than the extension allows. Transparent pixels of a
    unit's image are white (HWC3) and its EXIF orientation is applied; base64 longer than a file name works."""
    _, _, ours, path = e2e
    init = Image.fromarray(_image())
    unit = {"model": str(path), "module": "inpaint_global_harmonious"}
    with pytest.raises(RequestError, match="outpainting"):
        _img2img_plan(ours, unit, init, inpaint={"outpaint_right": 32})
    with pytest.raises(RequestError, match="at most 10 ControlNet units"):
        from latentforge.pipelines.request import GenerationRequest

        GenerationRequest.from_dict(dict(prompt="x", control=[{**unit, "image": init}] * 11)).validate()

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (10, 20, 30, 255)  # left opaque, right fully transparent
    image = control.read_control_image(Image.fromarray(rgba, "RGBA"), "unit")
    assert np.asarray(image)[0, 0].tolist() == [10, 20, 30] and np.asarray(image)[0, 63].tolist() == [255, 255, 255]
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: 90 degrees clockwise to show upright
    Image.new("RGB", (64, 32), (200, 0, 0)).save(buf, format="JPEG", exif=exif.tobytes())
    data = base64.b64encode(buf.getvalue()).decode()
    assert len(data) > 300 and control.read_control_image(data, "unit").size == (32, 64)
    long_name = "A" * 5000  # not a file name the system can hold, not base64 of an image either
    with pytest.raises(RequestError, match="unit"):
        control.read_control_image(long_name, "unit")
