"""Bad requests of every kind get the right 4xx (A1111's error shape, naming the field) and the server
keeps serving: wrong types, unknown samplers, missing images, hostile sizes, image bombs, oversized
bodies, path tricks in model names, wrong passwords, features that cannot run; a broken model file is a
500 without a traceback."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")

from latentforge.demo import bundled_model_path
from serverproc import Server

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")
AUTH = ("alice", "s3cret:with-colon")
JSON = {"Content-Type": "application/json"}
OK = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models = root / "models"
    (models / "sub").mkdir(parents=True)
    shutil.copy(bundled_model_path(), models / "sub" / "copy.safetensors")
    (models / "zz-broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    outside = root / "outside.safetensors"
    shutil.copy(bundled_model_path(), outside)
    os.symlink(outside, models / "escape.safetensors")  # points out of the folder: never listed
    outdir = root / "out"
    s = Server(
        "-m", str(bundled_model_path()), "--models-dir", str(models), "--api-auth", f"bob:pw,{AUTH[0]}:{AUTH[1]}",
        "--max-body-mb", "1", "--max-image-pixels", str(256 * 256), "--outdir", str(outdir),
        auth=AUTH, tmp=root,
    )  # fmt: skip
    yield s, outdir
    s.close()


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _err(r: requests.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert {"error", "detail", "body", "errors"} <= set(body)
    for w in words:
        assert w in body["detail"], body["detail"]
    assert "Traceback" not in r.text
    return body


def test_authentication(env):
    s, _ = env
    _err(s.get("/sdapi/v1/sd-models", auth=None), 401, "HTTP Basic")
    r = s.get("/sdapi/v1/sd-models", auth=("alice", "wrong"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert s.get("/", auth=None).status_code == 401  # the page too
    assert s.get("/sdapi/v1/sd-models", auth=("bob", "pw")).status_code == 200
    assert s.get("/sdapi/v1/sd-models").status_code == 200


def test_models_dir_listing_and_path_tricks(env):
    s, _ = env
    titles = [m["title"] for m in s.get("/sdapi/v1/sd-models").json()]
    assert titles == ["demo.safetensors", "sub/copy.safetensors", "zz-broken.safetensors"]
    for name in ["../outside", "../outside.safetensors", "/etc/passwd", "sub/../../outside", "..\\outside", "C:x"]:
        body = {**OK, "override_settings": {"sd_model_checkpoint": name}}
        _err(s.post("/sdapi/v1/txt2img", body), 400, "sd_model_checkpoint")
        _err(s.post("/sdapi/v1/options", {"sd_model_checkpoint": name}), 400)
    _err(s.post("/sdapi/v1/txt2img", {**OK, "override_settings": {"sd_model_checkpoint": "escape"}}), 400, "unknown")
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "refiner_checkpoint": "/etc/passwd"}), 400, "refiner_checkpoint")
    assert body["field"] == "refiner_checkpoint"
    # latentforge's option groups hold paths: sent by name they are only kept as other tools' fields
    sneaky = {"depth": {"map": "/etc/passwd"}, "inpaint": {"mask": "/etc/hostname"}, "networks": [{"name": "/x"}]}
    r = s.post("/sdapi/v1/img2img", {**OK, "init_images": [_b64(Image.new("RGB", (64, 64)))], **sneaky})
    assert r.status_code == 200, r.text
    assert "Mask blur" not in json.loads(r.json()["info"])["infotexts"][0]
    r = s.post("/sdapi/v1/txt2img", {**OK, "override_settings": {"sd_model_checkpoint": "copy"}})
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "sub/copy"


def test_wrong_types_and_unknown_names(env):
    s, _ = env
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "steps": "many"}), 422, "steps")
    assert body["field"] == "steps"
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "sampler_name": "Warp Drive"}), 400, "unknown sampler", "Euler a")
    assert body["field"] == "sampler_name"
    _err(s.post("/sdapi/v1/txt2img", {**OK, "scheduler": "wobbly"}), 400, "unknown schedule")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "enable_hr": True, "hr_upscaler": "ESRGAN 9x"}), 400, "upscaler")
    r = requests.post(s.url + "/sdapi/v1/txt2img", data="{not json", auth=AUTH, timeout=30)
    _err(r, 422)
    _err(s.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}), 400, "CLIP_stop_at_last_layers")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"width": 100000}, ["width", "8192"]),
        ({"height": 65}, ["height", "multiple of 8"]),
        ({"steps": 10**6}, ["steps"]),
        ({"steps": 0}, ["steps"]),
        ({"batch_size": 1000}, ["batch_size"]),
        ({"n_iter": 5000}, ["n_iter", "batch_count"]),
        ({"cfg_scale": "nan"}, ["cfg_scale"]),
        ({"seed": -5}, ["seed"]),
    ],
)
def test_hostile_sizes_and_numbers(env, change, words):
    s, _ = env
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, **change}), 400, *words)
    assert body["field"] == next(iter(change))


def test_features_that_cannot_run_are_refused(env):
    s, _ = env
    _err(s.post("/sdapi/v1/txt2img", {**OK, "refiner_checkpoint": "sdxl_refiner"}), 400, "refiner")
    unit = {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]"}
    _err(s.post("/sdapi/v1/txt2img", {**OK, "alwayson_scripts": {"controlnet": {"args": [unit]}}}), 400, "ControlNet")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "restore_faces": True}), 400, "restore_faces")
    assert s.post("/sdapi/v1/txt2img", {**OK, "subseed_strength": 0.5}).status_code == 200  # variation seeds run
    _err(s.post("/sdapi/v1/txt2img", {**OK, "override_settings": {"sd_vae": "other.vae.pt"}}), 400, "sd_vae")
    # empty script entries and unknown fields of other tools are fine
    r = s.post("/sdapi/v1/txt2img", {**OK, "alwayson_scripts": {"controlnet": {"args": []}}, "my_tool_field": 3})
    assert r.status_code == 200


def test_images_missing_broken_or_too_large(env):
    s, _ = env
    _err(s.post("/sdapi/v1/img2img", OK), 400, "init_images")
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": ["%%%not base64"]}), 400, "init_images[0]")
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [base64.b64encode(b"hello").decode()]}), 400, "image")
    bomb = _b64(Image.new("L", (4000, 4000)))  # a few kB that decode to 16 MB
    assert len(bomb) < 100_000
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [bomb]}), 400, "4000x4000", "65536")
    small = _b64(Image.new("RGB", (64, 64), (9, 9, 9)))
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [small], "mask": bomb}), 400, "mask")
    _err(s.post("/sdapi/v1/png-info", {"image": bomb}), 400, "image")
    r = s.post("/sdapi/v1/img2img", {**OK, "init_images": ["data:image/png;base64," + small]})
    assert r.status_code == 200


def test_body_size_limit(env):
    s, _ = env
    big = {**OK, "prompt": "x" * (2 << 20)}
    _err(s.post("/sdapi/v1/txt2img", big), 413, "limit")
    text = json.dumps(big).encode()

    def chunked():  # no Content-Length: the limit counts what arrives
        for i in range(0, len(text), 1 << 16):
            yield text[i : i + (1 << 16)]

    r = requests.post(s.url + "/sdapi/v1/txt2img", data=chunked(), auth=AUTH, timeout=60, headers=JSON)
    _err(r, 413, "limit")
    small = json.dumps(OK).encode()
    r = requests.post(
        s.url + "/sdapi/v1/txt2img", data=iter([small[:10], small[10:]]), auth=AUTH, timeout=60, headers=JSON
    )
    assert r.status_code == 200


def test_save_images_only_inside_outdir(env, tmp_path):
    s, outdir = env
    assert s.post("/sdapi/v1/options", {"outdir_samples": str(tmp_path)}).status_code == 200  # ignored
    r = s.post("/sdapi/v1/txt2img", {**OK, "save_images": True, "seed": 42, "outdir_samples": str(tmp_path)})
    assert r.status_code == 200
    saved = sorted(p.name for p in outdir.iterdir())
    assert saved and saved[-1].endswith("-42.png")
    assert list(tmp_path.iterdir()) == []
    assert "Seed: 42" in Image.open(outdir / saved[-1]).info["parameters"]


def test_broken_model_is_a_500_without_internals_and_the_server_goes_on(env):
    s, _ = env
    r = s.post("/sdapi/v1/txt2img", {**OK, "override_settings": {"sd_model_checkpoint": "zz-broken"}})
    body = _err(r, 500)
    assert "zz-broken" not in body["detail"] and "/" not in body["detail"]
    _err(s.get("/latentforge/v1/jobs/nope"), 404, "nope")
    assert s.post("/sdapi/v1/txt2img", OK).status_code == 200
