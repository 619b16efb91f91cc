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

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")

from latentforge.demo import bundled_model_path
from serverproc import Server
from serverproc import b64_png as _b64

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
    loras = root / "loras"
    loras.mkdir()
    import torch
    from safetensors.torch import save_file

    nan = {"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)}
    save_file({**nan, "lora_unet_x.alpha": torch.tensor(float("nan"))}, loras / "nan_alpha.safetensors")
    outside = root / "outside.safetensors"
    shutil.copy(bundled_model_path(), outside)
    os.symlink(outside, models / "escape.safetensors")  # points out of the folder: never listed
    outdir = root / "out"
    s = Server(
        "-m", str(bundled_model_path()), "--models-dir", str(models), "--api-auth", f"bob:pw,{AUTH[0]}:{AUTH[1]}",
        "--max-body-mb", "1", "--max-image-pixels", str(256 * 256), "--outdir", str(outdir), "--lora-dir", str(loras),
        auth=AUTH, tmp=root,
    )  # fmt: skip
    yield s, outdir
    s.close()


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
    # A1111's name_for_extra: os.path.splitext(os.path.basename(filename))[0], no folders
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "copy"


def test_wrong_types_and_unknown_names(env):
    s, _ = env
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "steps": "many"}), 422, "steps")
    assert body["field"] == "steps"
    _err(s.post("/sdapi/v1/txt2img", {**OK, "steps": True}), 422, "steps must be a number, got True")
    # A1111's own test payloads send its 0/1 choices as booleans: accepted as A1111 accepts them
    img = {**OK, "init_images": [_b64(Image.new("RGB", (64, 64)))], "denoising_strength": 0.5}
    r = s.post("/sdapi/v1/img2img", {**img, "inpainting_mask_invert": False, "inpainting_fill": True})
    assert r.status_code == 200, r.text
    # a setting every later request would fail on is refused when it is set
    _err(s.post("/sdapi/v1/options", {"randn_source": "gpu"}), 400, "randn_source", "CPU, GPU, NV")
    assert s.post("/sdapi/v1/txt2img", OK).status_code == 200
    # an infotext whose hires pass ran a model this server does not list: refused, not dropped
    text = "a cat\nSteps: 2, Seed: 1, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, Hires checkpoint: b"
    _err(s.post("/sdapi/v1/txt2img", {"infotext": text}), 400, "hr_checkpoint_name", "unknown model 'b'")
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [], "denoising_strength": False}), 422, "denoising_strength")
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "sampler_name": "Warp Drive"}), 400, "unknown sampler", "Euler a")
    assert body["field"] == "sampler_name"
    _err(s.post("/sdapi/v1/txt2img", {**OK, "scheduler": "wobbly"}), 400, "unknown schedule")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "enable_hr": True, "hr_upscaler": "ESRGAN 9x"}), 400, "upscaler")
    r = requests.post(s.url + "/sdapi/v1/txt2img", data="{not json", auth=AUTH, timeout=30)
    _err(r, 422)
    _err(s.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}), 400, "CLIP_stop_at_last_layers")
    # the demo model's text encoder has 4 layers: a deeper clip skip was a 500 ("generation failed")
    body = {**OK, "override_settings": {"CLIP_stop_at_last_layers": 5}}
    _err(s.post("/sdapi/v1/txt2img", body), 400, "clip_skip 5 is more than the 4 layers", "use 1 (the last layer) to 4")
    body = {**OK, "override_settings": {"CLIP_stop_at_last_layers": 4}}
    assert s.post("/sdapi/v1/txt2img", body).status_code == 200
    r = s.post("/sdapi/v1/txt2img", {**OK, "scheduler": "Linear Quadratic"})  # was a KeyError after the work
    assert r.status_code == 200 and "Schedule type: Linear Quadratic" in json.loads(r.json()["info"])["infotexts"][0]


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
    # A1111 fields outside its payload models that change the image: refused, or run (never dropped)
    small = _b64(Image.new("RGB", (64, 64), (90, 40, 9)))
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [small], "latent_mask": small}), 400, "latent_mask")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "enable_hr": True, "firstpass_image": small}), 400, "firstpass_image")
    tagged = {**OK, "prompt": "x <lora:not_there:0.7>"}
    _err(s.post("/sdapi/v1/txt2img", tagged), 400, "not_there")
    r = s.post("/sdapi/v1/txt2img", {**tagged, "disable_extra_networks": True})  # A1111: tags cut, none applied
    plain = s.post("/sdapi/v1/txt2img", OK).json()["images"][0]
    assert r.status_code == 200 and np.array_equal(_pixels(r.json()["images"][0]), _pixels(plain))
    masked = _b64(_box(64, 64))
    inpaint = {**OK, "init_images": [small], "mask": masked, "mask_blur": 8, "denoising_strength": 0.8}
    rounded, kept_grey = (s.post("/sdapi/v1/img2img", {**inpaint, "mask_round": v}).json() for v in (True, False))
    assert not np.array_equal(_pixels(rounded["images"][0]), _pixels(kept_grey["images"][0]))
    assert "Mask rounding: False" in kept_grey["info"]
    # img2img's noise multiplier: a number (not a bool), also from an infotext (A1111 maps it to its setting)
    img = {**OK, "init_images": [small], "denoising_strength": 0.6}
    _err(s.post("/sdapi/v1/img2img", {**img, "initial_noise_multiplier": False}), 422, "initial_noise_multiplier")
    sent = s.post("/sdapi/v1/img2img", {**img, "initial_noise_multiplier": 0.5}).json()
    text = json.loads(sent["info"])["infotexts"][0]
    assert "Noise multiplier: 0.5" in text
    read = s.post("/sdapi/v1/img2img", {"init_images": [small], "infotext": text}).json()
    assert np.array_equal(_pixels(read["images"][0]), _pixels(sent["images"][0]))
    # A1111's legacy firstphase_width/height: the image is made at that size (hires goes on from it)
    r = s.post("/sdapi/v1/txt2img", {**OK, "width": 128, "height": 96, "firstphase_width": 64, "firstphase_height": 64})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)
    hr = {**OK, "width": 256, "height": 256, "firstphase_width": 64, "firstphase_height": 96, "enable_hr": True}
    r = s.post("/sdapi/v1/txt2img", {**hr, "hr_scale": 1.5})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (96, 144)
    _err(s.post("/sdapi/v1/txt2img", {**OK, "firstphase_width": 64}), 400, "firstphase_height")
    # a network path inside the infotext is refused as in the prompt field
    path_tag = "x <lora:/etc/secret/ink.safetensors:1>\nSteps: 2, Seed: 1, Size: 64x64"
    _err(s.post("/sdapi/v1/txt2img", {"infotext": path_tag}), 400, "by name, not by path")


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _box(w: int, h: int) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, (16, 16, 48, 48))
    return m


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


def test_only_client_image_formats_are_decoded():
    """PIL opens any format it knows: an EPS went to Ghostscript (client PostScript run on the server; a
    500 when it failed) and a 4 kB DDS raised NotImplementedError (a 500)."""
    import struct

    from latentforge.server.errors import FieldError
    from latentforge.server.sdapi import decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n%%EOF\n"
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 32, 32, 0, 0, 0) + b"\0" * 44 + struct.pack("<2I", 32, 0)
    dds += b"\0" * 20 + struct.pack("<I", 0x1000) + b"\0" * 16 + b"\0" * 4096
    for raw in (eps, dds):
        with pytest.raises(FieldError, match="not an image in a format the server reads"):
            decode_image(base64.b64encode(raw).decode(), "init_images[0]", 1 << 20)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, format=fmt)
        assert decode_image(base64.b64encode(buf.getvalue()).decode(), "image", 1 << 20).size == (16, 8)


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


def test_broken_files_are_a_500_saying_which_and_why_without_paths_and_the_server_goes_on(env):
    """A model or LoRA the request chose that cannot be used: the library's message (which file, what is
    wrong), the server's folders cut from it; it used to be "generation failed; the server log has the
    details" for every one."""
    s, _ = env
    r = s.post("/sdapi/v1/txt2img", {**OK, "override_settings": {"sd_model_checkpoint": "zz-broken"}})
    body = _err(r, 500, "zz-broken.safetensors")
    assert body["error"] == "FileError" and "/" not in body["detail"] and "Traceback" not in body["detail"]
    body = _err(s.post("/sdapi/v1/options", {"sd_model_checkpoint": "zz-broken"}), 500, "zz-broken.safetensors")
    assert "/" not in body["detail"]
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "prompt": "x <lora:nan_alpha:1>"}), 500, "nan_alpha", "NaN")
    assert body["error"] == "FileError" and "/" not in body["detail"]
    _err(s.get("/latentforge/v1/jobs/nope"), 404, "nope")
    assert s.post("/sdapi/v1/txt2img", OK).status_code == 200


def _raw(s, path: str, data: bytes, **headers) -> requests.Response:
    return requests.post(s.url + path, data=data, auth=AUTH, timeout=60, headers={**JSON, **headers})


def test_bodies_are_checked_in_one_place_for_every_endpoint(env):
    """Guard's check_json: the same clear error on every route, before any handler runs."""
    s, _ = env
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/options"):
        _err(_raw(s, path, b'{"steps": 2,}'), 422, "not valid JSON", "line 1")
        _err(_raw(s, path, b'{"prompt": "\xff"}'), 400, "UTF-8")
        _err(_raw(s, path, b'{"seed": 1' + b"0" * 5000 + b"}"), 422, "thousands of digits")
        # deep nesting used to pass the parser and fail (500) when the response echoed it
        deep = b'{"zzz": ' + b"[" * 100 + b"]" * 100 + b"}"
        _err(_raw(s, path, deep), 422, "zzz[0][0]", "nested more than 32 levels")
        _err(_raw(s, path, b'{"zzz": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 422, "nested")
        # a body of many small values: millions of objects from a few MB (here 400 kB, under the 1 MB limit)
        _err(_raw(s, path, b'{"zzz": [' + b"0," * 200_000 + b"0]}"), 413, "100000 JSON values")
        body = _err(_raw(s, path, b'{"prompt": "a \\ud800 b"}'), 422, "prompt", "unpaired surrogate")
        assert body["field"] == "prompt"
    _err(_raw(s, "/latentforge/v1/jobs", b'{"zzz": ' + b"[" * 100 + b"]" * 100 + b"}"), 422, "nested")
    # the options stay readable (a deep value stored there used to make every GET a 500)
    assert s.get("/sdapi/v1/options").status_code == 200
    # commas and brackets inside strings are not values; surrogate pairs (emoji) are valid text
    r = s.post("/sdapi/v1/txt2img", {**OK, "prompt": "cat \U0001f600" + ", [x]" * 60_000})
    _err(r, 400, "prompt is", "characters long")
    assert s.post("/sdapi/v1/txt2img", {**OK, "prompt": "cat \U0001f600"}).status_code == 200


def test_unknown_routes_and_methods_have_the_error_shape(env):
    s, _ = env
    body = _err(s.post("/sdapi/v1/nope", {}), 404, "/sdapi/v1/nope")
    assert body["error"] == "NotFound"
    _err(s.get("/sdapi/v1/txt2img"), 405, "GET", "POST")
    r = requests.post(s.url + "/sdapi/v1/txt2img", data=json.dumps(OK), auth=AUTH, timeout=30,
                      headers={"Content-Type": "text/plain"})  # fmt: skip
    _err(r, 422, "JSON object", "Content-Type: application/json")


def test_a_repeated_content_type_cannot_slip_past_the_json_checks(env):
    """Starlette reads the first Content-Type; the checks read the last: with "application/json" then
    "text/plain" a lone surrogate reached the options, and every GET /sdapi/v1/options was a 500."""
    import http.client

    s, _ = env
    host, port = s.url.split("//")[1].split(":")
    for path, body in (
        ("/sdapi/v1/options", b'{"my_option": "\\ud800"}'),
        ("/sdapi/v1/txt2img", json.dumps(OK).encode()),
    ):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.putrequest("POST", path)
        conn.putheader("Authorization", "Basic " + base64.b64encode(":".join(AUTH).encode()).decode())
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Type", "text/plain")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        detail = json.loads(r.read())["detail"]
        assert r.status == 400 and "repeats a Content-Type" in detail, detail
        conn.close()
    assert s.get("/sdapi/v1/options").status_code == 200


def test_json_problem_keeps_no_traceback():
    """Raised from the parsing thread into the middleware's coroutine, the error kept the body and its
    decoded text in a reference cycle: about 2x the body size of memory per bad request until a full GC."""
    from latentforge.server.errors import json_problem

    e = json_problem(b'{"prompt": "' + b"x" * 1000, None)
    assert e is not None and e.status == 422 and "Unterminated string" in e.message
    assert e.__traceback__ is None and e.__context__ is None
    assert json_problem(b'{"prompt": "x"}', None) is None
    assert json_problem(b"not json at all", b"text/plain") is None  # left to the route (FastAPI's 422)


def test_option_values_are_checked(env):
    s, _ = env
    _err(s.post("/sdapi/v1/options", {"samples_format": 5}), 400, "samples_format")  # was a 500
    _err(_raw(s, "/sdapi/v1/options", b'{"my_option": NaN}'), 400, "my_option", "NaN")
    _err(s.post("/sdapi/v1/options", {"my_option": "x" * 100_000}), 400, "my_option", "65536")
    _err(s.post("/sdapi/v1/options", {f"opt{i}": i for i in range(600)}), 400, "512")
    # names are kept too: one of 50 MB per request grew the server by as much, for good
    _err(s.post("/sdapi/v1/options", {"k" * 200_000: 1}), 400, "not a setting name", "at most 128")
    assert s.post("/sdapi/v1/options", {"my_option": "fine"}).status_code == 200
    r = s.get("/sdapi/v1/options")
    assert r.status_code == 200 and r.json()["my_option"] == "fine" and "opt599" not in r.json()


def test_script_junk_is_a_400(env):
    s, _ = env
    for scripts in ({"adetailer": {"args": 5}}, {"adetailer": 5}, {"adetailer": {"args": "on"}}):
        body = _err(s.post("/sdapi/v1/txt2img", {**OK, "alwayson_scripts": scripts}), 400, "adetailer")
        assert body["field"] == "alwayson_scripts.adetailer"
    assert s.post("/sdapi/v1/txt2img", {**OK, "alwayson_scripts": {"x": {"args": None}}}).status_code == 200


def test_client_errors_found_while_generating_are_400s(env):
    s, _ = env
    # over the text encoder's chunk limit (under the 20000 characters of the request check): was a 500
    _err(s.post("/sdapi/v1/txt2img", {**OK, "prompt": "a " * 9999}), 400, "chunks of 75 tokens")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "prompt": "<lora:nope:1>"}), 400, "LoRA 'nope'")


def test_no_file_paths_from_clients(env):
    s, _ = env
    path = str(bundled_model_path())  # a real file: it used to be read, its tensor names sent back
    hires = {**OK, "enable_hr": True}
    for name in (path, "demo.safetensors", "../x.pth", "sub\\x"):
        _err(s.post("/sdapi/v1/txt2img", {**hires, "hr_upscaler": name}), 400, "hr_upscaler", "is a path")
    for tag in (f"<lora:{path}:1>", "<lora:../../x:1>", "<hypernet:/etc/x.pt:1>"):
        _err(s.post("/sdapi/v1/txt2img", {**OK, "prompt": tag}), 400, "by name, not by path")
        _err(s.post("/sdapi/v1/txt2img", {**OK, "negative_prompt": tag}), 400, "negative_prompt")
    assert s.post("/sdapi/v1/txt2img", {**hires, "hr_upscaler": "Latent (bicubic)"}).status_code == 200


@pytest.mark.parametrize(
    "change, field",
    [
        ({"width": 8192, "height": 4096}, "width"),  # within MAX_SIDE: minutes and gigabytes on a CPU
        ({"width": 1024, "height": 1024, "batch_size": 64}, "width"),
        ({"width": 4096, "height": 4096, "enable_hr": True}, "hr_scale"),
        ({"width": 512, "height": 512, "enable_hr": True, "hr_resize_x": 8192, "hr_resize_y": 8192}, "hr_scale"),
    ],
)
def test_output_size_limit(env, change, field):
    s, _ = env
    t = __import__("time").time()
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, **change}), 400, "--max-output-pixels", "16777216")
    assert body["field"] == field and __import__("time").time() - t < 10
    r = s.post("/latentforge/v1/jobs", {**OK, **change})
    _err(r, 400, "--max-output-pixels")


def test_init_image_count_and_pixel_budget(env):
    s, _ = env
    small = _b64(Image.new("RGB", (64, 64), (9, 9, 9)))
    # every init image was VAE-encoded on every pass: 10000 tiny images took the server out of memory
    body = _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [small] * 3}), 400, "3 images", "batch_size of 1")
    assert body["field"] == "init_images"
    assert s.post("/sdapi/v1/img2img", {**OK, "init_images": [small] * 2, "batch_size": 2}).status_code == 200
    full = _b64(Image.new("RGB", (256, 256), (9, 9, 9)))  # the server's limit for one image (256x256)
    r = s.post("/sdapi/v1/img2img", {**OK, "init_images": [full] * 8, "batch_size": 8, "mask": full})
    _err(r, 400, "together", "524288")
    # a header claiming 2^34 pixels: PIL's own bomb check, with the server's limit in the message
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1 << 17, 1 << 17, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    bomb = base64.b64encode(png).decode()
    _err(s.post("/sdapi/v1/img2img", {**OK, "init_images": [bomb]}), 400, "init_images[0]", "65536")
    _err(s.post("/sdapi/v1/png-info", {"image": bomb}), 400, "--max-image-pixels")


def test_force_task_id_and_long_messages_are_bounded(env):
    s, _ = env
    _err(s.post("/sdapi/v1/txt2img", {**OK, "force_task_id": "x" * 1000}), 400, "force_task_id", "128")
    _err(s.post("/sdapi/v1/txt2img", {**OK, "force_task_id": "a\nb"}), 400, "force_task_id")
    for bad in ("a/b", "a b", "a?b", "a#b", "a%2Fb", "..\\x"):  # a job id is a URL path segment
        _err(s.post("/sdapi/v1/txt2img", {**OK, "force_task_id": bad}), 400, "force_task_id", "without spaces")
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "sampler_name": "x" * 100_000}), 400, "unknown sampler", "(cut)")
    assert len(body["detail"]) <= 2000
    body = _err(s.post("/sdapi/v1/txt2img", {**OK, "steps": int("9" * 1000)}), 400, "steps must be at most 1000")
    assert len(body["detail"]) < 200
