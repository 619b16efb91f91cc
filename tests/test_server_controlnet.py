"""ControlNet through the A1111 API: the extension's alwayson_scripts units, its model and module lists,
and model names that can only be the server's own files."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serverproc import Server
from serverproc import b64_png as _b64
from tiny import write_demo_controlnet


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn-server")
    write_demo_controlnet(tmp / "cn" / "blobs.safetensors")
    srv = Server("--controlnet-dir", str(tmp / "cn"), tmp=tmp)
    yield srv
    srv.close()


def _txt2img(server, units=None):
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "width": 64, "height": 64, "cfg_scale": 4}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    return server.post("/sdapi/v1/txt2img", json=body)


def test_lists_and_units_run(server):
    models = server.get("/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("blobs [")
    assert "canny" in server.get("/controlnet/module_list").json()["module_list"]
    hint = Image.fromarray((np.indices((64, 64)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB")
    plain = _txt2img(server)
    unit = {"image": _b64(hint), "module": "none", "model": models[0], "weight": 1.0}
    controlled = _txt2img(server, [unit])
    assert plain.status_code == controlled.status_code == 200, controlled.text
    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))) for r in (plain, controlled))
    assert not np.array_equal(a, b)
    assert "ControlNet 0" in controlled.json()["info"]
    # the extension's pydantic model reads "no" and 0 as false ("no" used to count as enabled)
    for off in (False, "no", "false", 0):
        disabled = _txt2img(server, [{**unit, "enabled": off}])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(disabled.json()["images"][0])))), a)
    r = _txt2img(server, [{**unit, "enabled": "maybe"}])
    assert r.status_code == 400 and "args[0].enabled" in r.text


def test_unit_model_names_cannot_be_paths(server, tmp_path):
    hint = _b64(Image.new("RGB", (64, 64)))
    for model in ("/etc/passwd", "../cn/blobs", "nothere"):
        r = _txt2img(server, [{"image": hint, "model": model}])
        assert r.status_code in (400, 422) and "unknown ControlNet model" in r.text
    r = _txt2img(server, [{"model": "blobs"}])
    assert r.status_code in (400, 422) and "needs an image" in r.text


def test_version_and_unit_masks(server):
    """webuiapi's controlnet_version() read /controlnet/version (a 404); a unit's inpaint mask was ignored
    (now refused), and so was its effective_region_mask (now applied: white everywhere is the unit as it is,
    black everywhere no control at all)."""
    assert server.get("/controlnet/version").json() == {"version": 2}
    hint = _b64(Image.new("RGB", (64, 64)))
    for unit in ({"image": hint, "mask": hint}, {"image": {"image": hint, "mask": hint}}):
        r = _txt2img(server, [{**unit, "model": "blobs"}])
        assert r.status_code == 400 and "inpaint mask is not available" in r.text, r.text
    assert _txt2img(server, [{"image": {"image": hint, "mask": None}, "model": "blobs"}]).status_code == 200
    ramp = Image.fromarray((np.indices((64, 64)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB")
    unit = {"image": _b64(ramp), "model": "blobs", "weight": 1.0}

    def pixels(units):
        r = _txt2img(server, units)
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    full, plain = pixels([unit]), pixels(None)
    white, black = _b64(Image.new("RGB", (16, 16), "white")), _b64(Image.new("RGB", (64, 64), "black"))
    assert np.array_equal(pixels([{**unit, "effective_region_mask": white}]), full)
    assert np.array_equal(pixels([{**unit, "effective_region_mask": black}]), plain)
    left = np.zeros((64, 64, 3), np.uint8)
    left[:, :32] = 255
    half = pixels([{**unit, "effective_region_mask": _b64(Image.fromarray(left))}])
    assert not np.array_equal(half, full) and not np.array_equal(half, plain)
    r = _txt2img(server, [{**unit, "effective_region_mask": "not an image"}])
    assert r.status_code == 400 and "effective_region_mask" in r.text
    # the extension's pixel_perfect and hr_option reach the unit; fields that would change the image and
    # cannot run are refused, not dropped
    r = _txt2img(server, [{**unit, "module": "canny", "pixel_perfect": True, "hr_option": "Both"}])
    assert r.status_code == 200 and "Pixel Perfect: True" in r.json()["info"], r.text
    r = _txt2img(server, [{**unit, "hr_option": "Now and then"}])
    assert r.status_code == 400 and "hr_option" in r.text
    for key in ("advanced_weighting", "ipadapter_input"):
        r = _txt2img(server, [{**unit, key: [0.5] * 13}])
        assert r.status_code == 400 and key in r.text


def test_img2img_unit_without_image_takes_the_init_image(server):
    """The extension's choose_input_image: an img2img unit with no image of its own controls with the init
    image and img2img's resize mode: the same pixels as sending that image with that mode."""
    models = server.get("/controlnet/model_list").json()["model_list"]
    init = Image.fromarray((np.indices((48, 64)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB")
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "width": 64, "height": 64, "cfg_scale": 4}
    body.update(init_images=[_b64(init)], denoising_strength=0.6, resize_mode=2)

    def run(unit):
        r = server.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    unit = {"module": "none", "model": models[0], "weight": 1.0}
    taken = run(unit)
    assert np.array_equal(taken, run({**unit, "image": _b64(init), "resize_mode": 2}))
    assert not np.array_equal(taken, run({**unit, "image": _b64(init), "resize_mode": 1}))


def test_img2img_only_masked_inpainting_with_a_unit(server):
    """The A1111 API's img2img defaults to "only masked" (inpaint_full_res true): a unit runs, its input cut to
    the masked area (tests/test_controlnet_masked_area.py checks the pixels), or whole with the extension's
    inpaint_crop_input_image false."""
    models = server.get("/controlnet/model_list").json()["model_list"]
    init = Image.fromarray((np.indices((64, 96)).sum(0) % 32 * 8).astype(np.uint8)).convert("RGB")
    mask = np.zeros((64, 96), np.uint8)
    mask[20:36, 50:80] = 255
    body = {"prompt": "a red circle", "steps": 3, "seed": 3, "width": 64, "height": 64, "cfg_scale": 4}
    body.update(init_images=[_b64(init)], mask=_b64(Image.fromarray(mask)), denoising_strength=0.6)

    def run(unit):
        r = server.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        assert "Inpaint area: Only masked" in r.json()["info"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    unit = {"module": "none", "model": models[0], "weight": 1.0}
    cut, whole = run(unit), run({**unit, "inpaint_crop_input_image": False})
    assert cut.shape == (64, 96, 3) and not np.array_equal(cut, whole)
    r = server.post(
        "/sdapi/v1/img2img",
        json={**body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "inpaint_crop_input_image": "no"}]}}},
    )
    assert r.status_code == 400 and "inpaint_crop_input_image" in r.text, r.text
