"""The A1111 API as real clients use it: `webuiapi` and `sd-backend-client`, unchanged, against a real
`latentforge serve` process with the bundled demo model; pixels compared with the Python API."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

import latentforge  # noqa: E402
from latentforge.demo import bundled_model_path  # noqa: E402
from serverproc import Server  # noqa: E402

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--outdir", str(tmp_path_factory.mktemp("out")), tmp=tmp_path_factory.mktemp("srv"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)


@pytest.fixture(scope="module")
def pipe():
    return latentforge.load(bundled_model_path(), dtype="fp32")


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_webuiapi_txt2img_same_pixels_as_python_api(api, pipe):
    r = api.txt2img(prompt="a red circle", seed=7, width=64, height=64, steps=4, cfg_scale=5, batch_size=2, n_iter=2)
    assert len(r.images) == 4
    assert r.info["all_seeds"] == [7, 8, 9, 10]
    assert r.info["seed"] == 7 and r.info["width"] == 64 and r.info["sampler_name"] == "Euler a"
    assert "Seed: 9" in r.info["infotexts"][2]
    assert "Seed: 8" in r.images[1].info["parameters"]  # the PNG carries the infotext
    ref = pipe.txt2img(
        "a red circle",
        seed=7,
        width=64,
        height=64,
        steps=4,
        cfg_scale=5,
        sampler="Euler a",
        batch_size=2,
        batch_count=2,
    )
    for got, want in zip(r.images, ref.images):
        assert np.array_equal(pixels(got), pixels(want))


def test_webuiapi_variation_seeds_are_reported_as_a1111_reports_them(api, pipe):
    """info said subseed_strength 0.0, all_subseeds = the seeds and seed_resize -1 whatever was asked, and a
    random subseed differed between the run's batches: a client could not make the image again."""
    fields = dict(seed=7, subseed_strength=0.5, seed_resize_from_w=96, seed_resize_from_h=80, width=64, height=64)
    r = api.txt2img(prompt="a red circle", subseed=-1, steps=3, cfg_scale=5, batch_size=1, n_iter=2, **fields)
    info = r.info
    subseed = info["subseed"]
    assert info["all_seeds"] == [7, 7] and info["all_subseeds"] == [subseed, subseed + 1]
    assert info["subseed_strength"] == 0.5 and (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (96, 80)
    for i, text in enumerate(info["infotexts"]):
        assert f"Variation seed: {subseed + i}," in text and "Seed resize from: 96x80" in text, text
    ref = pipe.txt2img(
        "a red circle", subseed=subseed, steps=3, cfg_scale=5, sampler="Euler a", batch_count=2, **fields
    )
    for got, want in zip(r.images, ref.images):
        assert np.array_equal(pixels(got), pixels(want))


def test_webuiapi_img2img_with_mask_keeps_unmasked_pixels(api, pipe):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    ImageDraw.Draw(init).ellipse((8, 8, 40, 40), fill=(20, 60, 220))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)  # repaint the right half
    r = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a green square",
        seed=3,
        steps=4,
        width=64,
        height=64,
        denoising_strength=0.8,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
    )
    # A1111 sets is_using_inpainting_conditioning in inpainting models' conditioning only: the demo model is not one
    assert len(r.images) == 1 and r.info["is_using_inpainting_conditioning"] is False
    out = pixels(r.images[0])
    # A1111's overlay: pixels outside the mask are the init image's, byte for byte
    assert np.array_equal(out[:, :32], pixels(init)[:, :32])
    assert not np.array_equal(out[:, 32:], pixels(init)[:, 32:])
    ref = pipe.img2img(
        init,
        "a green square",
        seed=3,
        steps=4,
        width=64,
        height=64,
        denoising_strength=0.8,
        sampler="Euler a",
        mask=mask,
        mask_blur=0,
        inpainting_fill=1,
        cfg_scale=7.0,  # what webuiapi's img2img sends by default (the demo model's own default is 2)
    )
    assert np.array_equal(out, pixels(ref.images[0]))


def test_webuiapi_lists_samplers_and_models_and_sets_the_model(api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert api.util_get_model_names() == ["demo.safetensors"]
    api.util_set_model("demo")
    assert api.util_get_current_model() == "demo.safetensors"
    assert [s["name"] for s in api.get_schedulers()][:2] == ["automatic", "normal"]
    assert api.get_sd_models()[0]["hash"]  # loaded: hashed


def test_webuiapi_png_info_reads_the_infotext(api):
    r = api.txt2img(prompt="a blue sky", seed=11, width=64, height=64, steps=2)
    info = api.png_info(r.images[0])
    assert info.info.startswith("a blue sky\nSteps: 2, Sampler: Euler a")
    assert info.json["parameters"]["Seed"] == "11"
    # A1111's parse_generation_parameters: a size as KEY-1/KEY-2; the text is not repeated in items
    params, items = info.json["parameters"], info.json["items"]
    assert (params["Size-1"], params["Size-2"]) == ("64", "64") and "Size" not in params, params
    assert params["Prompt"] == "a blue sky" and "parameters" not in items


def test_png_info_reads_jpeg_and_webp_exif_as_a1111(server, tmp_path):
    """JPEG and WebP carry the parameters in their EXIF UserComment (A1111 writes them there); png-info
    read only PNG text chunks and answered info "" for them. A request without an image is a 422."""
    import base64

    from latentforge.io.images import save_image

    image = Image.new("RGB", (64, 48), "blue")
    image.info["parameters"] = "a blue wall\nNegative prompt: dust\nSteps: 3, Seed: 5, Size: 64x48"
    for name in ("x.jpg", "x.webp"):
        path = save_image(image, tmp_path / name)
        r = server.post("/sdapi/v1/png-info", {"image": base64.b64encode(path.read_bytes()).decode()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["info"] == image.info["parameters"], (name, body)
        assert body["parameters"]["Negative prompt"] == "dust" and body["parameters"]["Size-2"] == "48"
    assert server.post("/sdapi/v1/png-info", {}).status_code == 422


def test_webuiapi_progress_and_interrupt(api, server):
    results = {}

    def run():
        results["r"] = api.txt2img(prompt="slow", seed=1, width=64, height=64, steps=400, n_iter=3)

    t = threading.Thread(target=run)
    t.start()
    seen = None
    for _ in range(300):
        p = api.get_progress()
        if p["progress"] > 0 and p["state"]["sampling_step"] > 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress was reported"
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 400
    assert seen["current_image"]  # a preview of the running job
    Image.open(__import__("io").BytesIO(__import__("base64").b64decode(seen["current_image"]))).load()
    assert api.interrupt() == {}
    t.join(60)
    assert not t.is_alive()
    r = results["r"]
    # stopped in the first of 3 passes: A1111 gives the image being made (its last denoised estimate)
    assert len(r.images) == 1 and r.images[0].size == (64, 64) and r.info["interrupted"] is True
    assert r.info["all_seeds"] == [1] and "Seed: 1," in r.info["infotexts"][0]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    # and the server keeps serving
    assert len(api.txt2img(prompt="after", seed=2, width=64, height=64, steps=2).images) == 1


def test_sd_backend_client_strict_schemas(server):
    sbc = pytest.importorskip("sd_backend_client")
    client = sbc.A1111Webservice(server.url)
    params = sbc.DiffusionParams(prompt="a red circle", negative_prompt="blur", steps=3, width=64, height=64, seed=5)
    res = client.txt2img(params)  # validates `info` against its GenerationInfoData
    assert len(res["images"]) == 1 and res["info"].all_seeds == [5] and res["info"].negative_prompt == "blur"
    progress = client.progress_check()  # validates /progress against its ProgressResponseBody
    assert progress.state.stopping_generation is False
    models = client.get_models()
    assert models[0].model_name == "demo"
    assert client.interrupt() == {}


def test_concurrent_clients_each_get_their_own_image(server, pipe):
    jobs = list(range(16))
    got: dict[int, np.ndarray] = {}
    errors: list[str] = []

    def client(ids):
        for i in ids:
            r = server.post(
                "/sdapi/v1/txt2img",
                {
                    "prompt": f"shape {i}",
                    "seed": 100 + i,
                    "steps": 2,
                    "width": 64,
                    "height": 64,
                    "sampler_name": "Euler",
                },
            )
            if r.status_code != 200:
                errors.append(r.text)
                continue
            import base64
            import io

            got[i] = pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    threads = [threading.Thread(target=client, args=(jobs[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert sorted(got) == jobs
    for i in (0, 7, 15):
        ref = pipe.txt2img(f"shape {i}", seed=100 + i, steps=2, width=64, height=64, sampler="Euler")
        # queued jobs may run batched (server/batching.py): equal to the image alone within float rounding
        # (a larger batch may sum in another order on a CPU), far from any other client's image
        diff = np.abs(got[i].astype(np.int16) - pixels(ref.images[0]).astype(np.int16))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def _image(response) -> np.ndarray:
    import base64
    import io

    assert response.status_code == 200, response.text
    return pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def _info(response) -> dict:
    import json

    return json.loads(response.json()["info"])


def test_infotext_field_fills_what_the_request_leaves_out(server, pipe):
    """A1111 1.8+ applies the ``infotext`` field (Api.apply_infotext): its parameters fill the request's
    unset fields, its settings (Clip skip, ENSD, RNG) the override_settings; fields sent win. It was
    accepted and ignored: the request ran with A1111's defaults."""
    made = pipe.txt2img("a red circle", negative_prompt="blur", seed=11, steps=3, cfg_scale=5, sampler="Euler a",
                        width=64, height=64, eta_noise_seed_delta=31337, rng="NV")  # fmt: skip
    text = made.infotexts[0]
    assert "ENSD: 31337" in text and "RNG: NV" in text
    r = server.post("/sdapi/v1/txt2img", {"infotext": text})
    assert np.array_equal(_image(r), pixels(made.images[0]))
    info = _info(r)
    assert (info["seed"], info["steps"], info["negative_prompt"], info["sampler_name"]) == (11, 3, "blur", "Euler a")
    assert info["infotexts"][0] == text
    r = server.post("/sdapi/v1/txt2img", {"infotext": text, "seed": 12, "steps": 2})  # sent fields win
    assert (_info(r)["seed"], _info(r)["steps"]) == (12, 2) and "ENSD: 31337" in _info(r)["infotexts"][0]
    r = server.post("/sdapi/v1/txt2img", {"infotext": text, "override_settings": {"randn_source": "CPU"}})
    assert "RNG: CPU" in _info(r)["infotexts"][0]
    r = server.post("/sdapi/v1/txt2img", {"infotext": "x\nSteps: 3, Seed: many, Size: 64x64"})
    assert r.status_code == 400 and "infotext" in r.json()["detail"]


def test_a1111_settings_that_change_images_apply_from_options_and_override_settings(server, pipe):
    """ENSD, the noise source and token merging are A1111 settings: POST /sdapi/v1/options sets them for
    the requests that follow, override_settings for one. They were stored and echoed but not used."""
    body = {"prompt": "a red circle", "seed": 4, "steps": 3, "cfg_scale": 5, "sampler_name": "Euler a",
            "width": 64, "height": 64}  # fmt: skip
    want = pipe.txt2img("a red circle", seed=4, steps=3, cfg_scale=5, sampler="Euler a", width=64, height=64,
                        eta_noise_seed_delta=31337, rng="NV")  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", {**body, "override_settings": {"eta_noise_seed_delta": 31337,
                                                                         "randn_source": "NV"}})  # fmt: skip
    assert np.array_equal(_image(r), pixels(want.images[0]))
    plain = server.post("/sdapi/v1/txt2img", body)
    assert "ENSD" not in _info(plain)["infotexts"][0]  # override_settings held for that request only
    try:
        assert server.post("/sdapi/v1/options", {"eta_noise_seed_delta": 31337, "randn_source": "NV"}).ok
        r = server.post("/sdapi/v1/txt2img", body)
        assert np.array_equal(_image(r), pixels(want.images[0]))
        r = server.post("/sdapi/v1/options", {"randn_source": "Dice"})  # refused when set, not at every request
        assert r.status_code == 400 and "randn_source" in r.json()["detail"], r.text
        assert np.array_equal(_image(server.post("/sdapi/v1/txt2img", body)), pixels(want.images[0]))
    finally:
        server.post("/sdapi/v1/options", {"eta_noise_seed_delta": 0, "randn_source": "CPU"})
    assert np.array_equal(_image(server.post("/sdapi/v1/txt2img", body)), _image(plain))


def test_hires_pass_of_its_own_and_noise_multiplier_as_the_python_api(server, pipe):
    """A1111's hr_prompt, hr_negative_prompt, hr_sampler_name, hr_scheduler and img2img's
    initial_noise_multiplier (a field, and a setting) run as the Python API runs them; they were refused.
    A second model for the hires pass is still refused."""
    body = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "cfg_scale": 5}  # fmt: skip
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_prompt": "a blue square", "hr_negative_prompt": "blur",
          "hr_sampler_name": "Euler a", "hr_scheduler": "Karras", "denoising_strength": 0.6}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", {**body, **hr})
    want = pipe.txt2img("a red circle", steps=3, width=64, height=64, seed=5, sampler="Euler", cfg_scale=5, **hr)
    assert np.array_equal(_image(r), pixels(want.images[0]))
    text = _info(r)["infotexts"][0]
    assert "Hires prompt: a blue square" in text and "Hires sampler: Euler a" in text
    assert np.array_equal(_image(server.post("/sdapi/v1/txt2img", {"infotext": text})), _image(r))
    same = {"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler", "hr_prompt": ""}
    r = server.post("/sdapi/v1/txt2img", {**body, **hr, **same})
    assert r.ok and "Hires sampler" not in _info(r)["infotexts"][0]
    r = server.post("/sdapi/v1/txt2img", {**body, **hr, "hr_checkpoint_name": "other.safetensors"})
    assert r.status_code == 400 and "hr_checkpoint_name" in r.json()["detail"]
    r = server.post("/sdapi/v1/txt2img", {**body, **hr, "hr_prompt": "<lora:../x:1>"})
    assert r.status_code == 400 and "by name, not by path" in r.json()["detail"]
    import base64
    import io

    buf = io.BytesIO()
    image = Image.new("RGB", (64, 64), "red")
    image.save(buf, format="PNG")
    img = {**body, "init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.5}
    want = pipe.img2img(image, "a red circle", steps=3, seed=5, sampler="Euler", cfg_scale=5,
                        denoising_strength=0.5, initial_noise_multiplier=0.8).images[0]  # fmt: skip
    r = server.post("/sdapi/v1/img2img", {**img, "initial_noise_multiplier": 0.8})
    assert np.array_equal(_image(r), pixels(want)) and "Noise multiplier: 0.8" in _info(r)["infotexts"][0]
    r = server.post("/sdapi/v1/img2img", {**img, "override_settings": {"initial_noise_multiplier": 0.8}})
    assert np.array_equal(_image(r), pixels(want))
    plain = server.post("/sdapi/v1/img2img", {**img, "initial_noise_multiplier": 1, "image_cfg_scale": 1.5})
    assert plain.ok and not np.array_equal(_image(plain), pixels(want))


def test_include_init_images_echoes_them_in_parameters_as_a1111(server):
    """A1111's img2img API keeps the init images (as sent) in ``parameters`` when include_init_images is
    set, and leaves ``images`` to the results; they were appended to ``images`` instead."""
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    sent = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "init_images": [sent], "denoising_strength": 0.5}
    r = server.post("/sdapi/v1/img2img", {**body, "include_init_images": True}).json()
    assert len(r["images"]) == 1 and r["parameters"]["init_images"] == [sent]
    r = server.post("/sdapi/v1/img2img", body).json()
    assert len(r["images"]) == 1 and r["parameters"]["init_images"] is None


def test_tiling_runs_as_the_python_api_and_from_an_infotext(server, pipe):
    """A1111's ``tiling`` was refused; it now makes the same seamless image as the Python API's
    ``tiling=True`` (itself checked against diffusers with circular convolutions in tests/test_tiling.py),
    and an infotext's "Tiling: True" turns it on."""
    body = {"prompt": "a red circle", "seed": 6, "steps": 3, "cfg_scale": 5, "width": 64, "height": 64,
            "sampler_name": "Euler a"}  # fmt: skip
    want = pipe.txt2img("a red circle", seed=6, steps=3, cfg_scale=5, width=64, height=64, sampler="Euler a",
                        tiling=True)  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", {**body, "tiling": True})
    assert r.status_code == 200, r.text
    assert np.array_equal(_image(r), pixels(want.images[0]))
    text = _info(r)["infotexts"][0]
    assert "Tiling: True" in text
    plain = server.post("/sdapi/v1/txt2img", body)
    assert not np.array_equal(_image(plain), _image(r)) and "Tiling" not in _info(plain)["infotexts"][0]
    again = server.post("/sdapi/v1/txt2img", {"infotext": text})
    assert np.array_equal(_image(again), _image(r))
