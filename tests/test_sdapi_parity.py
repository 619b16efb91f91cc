"""A1111 v1.10 parity of the ``/sdapi/v1`` routes, each expectation written from A1111's own rule (quoted
in the tests): resize mode 3, ``refiner_checkpoint: "None"``, ``override_settings_restore_afterwards``, the
sampler settings, the ``infotext`` field's echo, and the ``info`` fields ``is_using_inpainting_conditioning``,
``denoising_strength``, ``seed_resize_from_w/h``, ``subseed`` and ``sd_model_name``.

Most tests run in process against a stub queue (no model); those that need a finished job run tiny models
(64 px, 2 steps) on the real queue."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from latentforge.server.app import create_app
from latentforge.server.config import ServerConfig
from test_server_app import StubQueue

OK = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture
def client():  # the app on a queue that records each job and runs nothing
    queue = StubQueue()
    c = TestClient(create_app(ServerConfig(), queue=queue), raise_server_exceptions=False)
    c.queue = queue
    return c


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _info(r) -> dict:
    return json.loads(_ok(r)["info"])


def _gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


# ---- 1. img2img resize_mode 3, "Just resize (latent upscale)"


def test_resize_mode_3_encodes_the_image_at_its_own_size_then_resizes_the_latent(tmp_path):
    """A1111 (StableDiffusionProcessingImg2Img.init): ``if crop_region is None and self.resize_mode != 3:
    image = images.resize_image(...)``; the image is encoded as it is, then ``init_latent =
    interpolate(init_latent, size=(height // opt_f, width // opt_f), mode="bilinear")``. The expectation is
    diffusers' AutoencoderKL on the unresized image (sides not multiples of 8), then torch's interpolate."""
    import latentforge
    from latentforge.pipelines.generate import build_plan
    from latentforge.pipelines.request import GenerationRequest
    from tiny import build_reference, save_folder

    ref = build_reference("sd1", seed=5)
    pipe = latentforge.load(save_folder(ref, tmp_path / "m"), dtype="fp32")
    image = _gradient(100, 70)  # 100 x 70: neither side a multiple of 8
    req = GenerationRequest(prompt="x", steps=2, width=72, height=64, resize_mode=3, denoising_strength=0.5)
    req.validate(img2img=True)
    with torch.inference_mode():
        plan = build_plan(pipe, req, [image])
        got = plan.passes[0].start(0, None, [1])
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latent = ref.vae.encode(pixels).latent_dist.mean * ref.vae.config.scaling_factor
    assert latent.shape[-2:] == (70 // 8, 100 // 8)
    want = torch.nn.functional.interpolate(latent, size=(64 // 8, 72 // 8), mode="bilinear")
    assert got.shape == want.shape
    assert torch.allclose(got.float(), want, atol=1e-5), float((got - want).abs().max())
    # the whole run makes an image of the asked size
    out = pipe.img2img(image, prompt="x", steps=2, width=72, height=64, resize_mode=3, seed=3)
    assert out.images[0].size == (72, 64)


def test_resize_mode_3_is_taken_by_the_api_and_refused_with_a_mask_or_the_x4_upscaler(client):
    body = {**OK, "init_images": [_b64(_gradient(100, 70))], "resize_mode": 3}
    params = _ok(client.post("/sdapi/v1/img2img", json=body))["parameters"]
    assert params["resize_mode"] == 3
    (spec,) = client.queue.submitted
    assert spec.request.resize_mode == 3
    # with a mask A1111 fits the mask in pixels (resize and fill) while the latent is stretched: misaligned
    masked = {**body, "mask": _b64(Image.new("L", (100, 70), 255))}
    r = client.post("/sdapi/v1/img2img", json=masked)
    assert r.status_code == 400 and r.json()["field"] == "resize_mode", r.text
    assert "mask" in r.json()["detail"]
    from latentforge.pipelines.request import GenerationRequest, RequestError, X4Options

    with pytest.raises(RequestError, match="x4"):
        GenerationRequest(prompt="x", resize_mode=3, x4=X4Options()).validate(img2img=True)


# ---- 2. refiner_checkpoint "None"


@pytest.mark.parametrize("name", ["None", "none", ""])
def test_refiner_checkpoint_none_means_no_refiner(client, name):
    """A1111 (process_images_inner): ``if p.refiner_checkpoint not in (None, "", "None", "none"):`` load it."""
    _ok(client.post("/sdapi/v1/txt2img", json={**OK, "refiner_checkpoint": name, "refiner_switch_at": 0.5}))
    (spec,) = client.queue.submitted
    assert spec.request.refiner is None and spec.refiner_model is None


def test_hires_checkpoint_none_is_a_name_as_in_a1111(client):
    """A1111 (Txt2Img.init): ``if self.hr_checkpoint_name and self.hr_checkpoint_name != 'Use same checkpoint'``
    looks the name up ("Could not find checkpoint with name None"): only "Use same checkpoint" means this one."""
    hires = {**OK, "enable_hr": True, "hr_scale": 1.5}
    _ok(client.post("/sdapi/v1/txt2img", json={**hires, "hr_checkpoint_name": "Use same checkpoint"}))
    assert client.queue.submitted[0].hires_model is None
    r = client.post("/sdapi/v1/txt2img", json={**hires, "hr_checkpoint_name": "None"})
    assert r.status_code == 400 and r.json()["field"] == "hr_checkpoint_name", r.text


# ---- 3. override_settings_restore_afterwards


def test_overridden_settings_persist_when_not_restored(client):
    """A1111 (process_images): every override is ``opts.set`` before the run; ``if
    p.override_settings_restore_afterwards:`` the stored values are put back, otherwise they stay."""
    kept = {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337, "s_churn": 0.5, "some_extension_option": 7}
    _ok(client.post("/sdapi/v1/txt2img", json={**OK, "override_settings": {"eta_noise_seed_delta": 5}}))
    assert "eta_noise_seed_delta" not in client.get("/sdapi/v1/options").json()  # restored (the default)
    body = {**OK, "override_settings": kept, "override_settings_restore_afterwards": False}
    _ok(client.post("/sdapi/v1/txt2img", json=body))
    options = client.get("/sdapi/v1/options").json()
    assert {k: options.get(k) for k in kept} == kept
    _ok(client.post("/sdapi/v1/txt2img", json={**OK, "sampler_name": "Euler"}))  # a later request uses them
    later = client.queue.submitted[-1].request
    assert (later.clip_skip, later.eta_noise_seed_delta, later.s_churn) == (2, 31337, 0.5)


def test_settings_kept_are_checked_as_options_are(client):
    body = {**OK, "override_settings": {"outdir_samples": "/tmp/elsewhere", "samples_format": "jpg"}}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings_restore_afterwards": False})
    assert r.status_code == 400 and r.json()["field"] == "samples_format", r.text
    assert client.queue.submitted == []  # refused before the run
    body = {**OK, "override_settings": {"outdir_samples": "/tmp/elsewhere"}}
    _ok(client.post("/sdapi/v1/txt2img", json={**body, "override_settings_restore_afterwards": False}))
    assert client.get("/sdapi/v1/options").json()["outdir_samples"] != "/tmp/elsewhere"


# ---- 4. sampler settings


SETTINGS = {"s_churn": 0.3, "s_tmin": 0.1, "s_tmax": 5.0, "s_noise": 0.9, "s_min_uncond": 2.0}


def _request(client, **fields):
    _ok(client.post("/sdapi/v1/txt2img", json={**OK, **fields}))
    return client.queue.submitted[-1].request


@pytest.mark.parametrize("where", ["options", "override_settings"])
def test_sampler_settings_fill_the_request_as_a1111(client, where):
    """A1111 1.10: ``fill_fields_from_opts`` (``s_churn = self.s_churn if self.s_churn is not None else
    opts.s_churn``, the same for s_tmin, s_tmax (``or inf``), s_noise, s_min_uncond), then
    ``Sampler.initialize``: for the samplers of ``sampler_extra_params`` (s_churn/s_tmin/s_tmax: Euler, Heun,
    DPM2; s_noise: those and DPM fast, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE) a setting
    other than the sampler's default (0, 0, inf, 1) is used, the request's own value otherwise; eta is
    ``p.eta if p.eta is not None else opts.<eta_option_field>``: eta_ancestral (k-diffusion), eta_ddim (DDIM)."""
    values = {**SETTINGS, "eta_ancestral": 0.6, "eta_ddim": 0.4}
    fields = {}
    if where == "options":
        _ok(client.post("/sdapi/v1/options", json=values))
    else:
        fields = {"override_settings": values}
    euler = _request(client, sampler_name="Euler", **fields)
    assert (euler.s_churn, euler.s_tmin, euler.s_tmax, euler.s_noise) == (0.3, 0.1, 5.0, 0.9)
    assert euler.s_min_uncond == 2.0  # the CFG denoiser's, every sampler
    assert euler.eta is None  # Euler takes no eta
    ancestral = _request(client, sampler_name="Euler a", **fields)
    assert ancestral.eta == 0.6  # eta_ancestral
    assert (ancestral.s_churn, ancestral.s_noise, ancestral.s_min_uncond) == (0.0, 1.0, 2.0)  # not in its params
    assert _request(client, sampler_name="DDIM", **fields).eta == 0.4  # eta_ddim
    assert _request(client, sampler_name="DPM++ 2M SDE", **fields).s_noise == 0.9
    plain = _request(client, sampler_name="DPM++ 2M", **fields)
    assert (plain.s_churn, plain.s_noise, plain.eta) == (0.0, 1.0, None)
    # the request's eta wins (p.eta is not None); a non-default setting wins over the request's s_churn
    sent = _request(client, sampler_name="Euler a", eta=0.2, **fields)
    assert sent.eta == 0.2
    assert _request(client, sampler_name="Euler", s_churn=0.7, s_min_uncond=1.5, **fields).s_churn == 0.3
    assert _request(client, sampler_name="Euler", s_min_uncond=1.5, **fields).s_min_uncond == 1.5


def test_sampler_settings_at_their_defaults_leave_the_request_its_own_values(client):
    defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0}
    _ok(client.post("/sdapi/v1/options", json={**defaults, "eta_ancestral": 1.0, "eta_ddim": 0.0}))
    req = _request(client, sampler_name="Euler", s_churn=0.7, s_tmin=0.2, s_noise=1.1)
    assert (req.s_churn, req.s_tmin, req.s_tmax, req.s_noise) == (0.7, 0.2, float("inf"), 1.1)
    euler_a = _request(client, sampler_name="Euler a")
    assert euler_a.eta is None  # the sampler's own default eta (1), as A1111 with eta_ancestral 1
    assert _request(client, sampler_name="Euler a", eta=0.5).eta == 0.5


def test_sampler_settings_out_of_range_are_refused(client):
    r = client.post("/sdapi/v1/options", json={"s_noise": -1})
    assert r.status_code == 400 and r.json()["field"] == "s_noise", r.text
    r = client.post("/sdapi/v1/options", json={"eta_ancestral": "lots"})
    assert r.status_code == 400 and r.json()["field"] == "eta_ancestral", r.text
    r = client.post("/sdapi/v1/txt2img", json={**OK, "override_settings": {"s_churn": 1000}})
    assert r.status_code == 400 and r.json()["field"] == "override_settings.s_churn", r.text
    assert client.queue.submitted == []
    # DPM2 gets s_churn in A1111 (sampler_extra_params), and so in latentforge
    r = client.post("/sdapi/v1/txt2img", json={**OK, "sampler_name": "DPM2", "override_settings": {"s_churn": 0.5}})
    assert r.status_code == 200, r.text
    assert client.queue.submitted[-1].request.s_churn == 0.5


# ---- 5. the infotext field


INFOTEXT = (
    "a lighthouse\nNegative prompt: fog\n"
    "Steps: 3, Sampler: Euler, CFG scale: 5, Seed: 42, Size: 64x72, Batch size: 2, Clip skip: 2"
)


def test_infotext_values_are_echoed_in_parameters(client):
    """A1111 (Api.apply_infotext): ``setattr(request, field.api, value)`` for each paste field the request did
    not set, and ``request.override_settings[setting_name] = value`` for its settings; the response's
    ``parameters`` is ``vars(txt2imgreq)``. "Batch size" is a paste field of 1.10's txt2img and img2img tabs
    (``PasteField(batch_size, "Batch size", api="batch_size")``)."""
    params = _ok(client.post("/sdapi/v1/txt2img", json={"infotext": INFOTEXT, "steps": 2}))["parameters"]
    want = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 2, "sampler_name": "Euler", "seed": 42}
    want.update(cfg_scale=5.0, width=64, height=72, batch_size=2)
    assert {k: params[k] for k in want} == want
    assert params["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    (spec,) = client.queue.submitted
    assert (spec.request.batch_size, spec.request.height, spec.request.clip_skip) == (2, 72, 2)
    body = {**OK, "infotext": INFOTEXT, "batch_size": 1, "init_images": [_b64(_gradient(64, 64))]}
    params = _ok(client.post("/sdapi/v1/img2img", json=body))["parameters"]
    assert (params["batch_size"], params["prompt"], params["steps"]) == (1, "x", 2)  # sent: kept


# ---- 7, 8. info's denoising_strength, seed_resize_from_w/h, subseed


def test_info_reports_the_sent_values_as_a1111(client):
    """A1111 (Processed.__init__): ``denoising_strength = getattr(p, 'denoising_strength', None)`` (txt2img
    without hires too), ``seed_resize_from_w = p.seed_resize_from_w`` (as given; the API's default is -1), and
    ``subseed = p.all_subseeds[0]`` with ``all_subseeds = [int(get_fixed_seed(p.subseed)) + x ...]``: the
    subseed sent, or a random one for -1, also without variations."""
    info = _info(client.post("/sdapi/v1/txt2img", json={**OK, "denoising_strength": 0.4, "subseed": 5}))
    assert info["denoising_strength"] == 0.4
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (-1, -1)
    assert info["subseed"] == 5 and info["subseed_strength"] == 0
    info = _info(client.post("/sdapi/v1/txt2img", json={**OK, "seed_resize_from_w": 0, "seed_resize_from_h": 0}))
    assert info["denoising_strength"] is None
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (0, 0)
    assert 0 <= info["subseed"] < 4294967294  # get_fixed_seed(-1): random.randrange(4294967294)
    assert client.queue.submitted[-1].request.subseed == info["subseed"]
    body = {**OK, "subseed": 7, "subseed_strength": 0.5, "seed_resize_from_w": 96, "seed_resize_from_h": 80}
    info = _info(client.post("/sdapi/v1/txt2img", json=body))
    assert (info["subseed"], info["seed_resize_from_w"], info["seed_resize_from_h"]) == (7, 96, 80)


# ---- 6, 9. info's is_using_inpainting_conditioning and sd_model_name, from real jobs on tiny models


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server on tiny models: a diffusers folder "sd-v1.5", an inpainting folder, and a single file in a
    subfolder (``sub/tiny.safetensors``)."""
    import latentforge
    from tiny import build_reference, save_folder

    models = tmp_path_factory.mktemp("models")
    folder = save_folder(build_reference("sd1", seed=1), models / "sd-v1.5")
    save_folder(build_reference("sd1-inpaint", seed=2), models / "inpaint")
    (models / "sub").mkdir()
    latentforge.load(folder).save(models / "sub" / "tiny.safetensors")
    config = ServerConfig(models_dir=models, dtype="fp32", outdir=tmp_path_factory.mktemp("out"))
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        yield c


def _run(c, path: str, model: str, **fields) -> dict:
    body = {**OK, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": model}, **fields}
    return _info(c.post(path, json=body))


def test_is_using_inpainting_conditioning_follows_the_model(live):
    """A1111: ``txt2img_image_conditioning`` sets it for models with ``conditioning_key in {'hybrid',
    'concat'}`` (inpainting models), ``inpainting_image_conditioning`` (img2img on them, mask or not) sets it
    True; img2img with a mask on a plain model never calls it: False."""
    init = [_b64(_gradient(64, 64))]
    mask = _b64(Image.new("L", (64, 64), 255))
    assert _run(live, "/sdapi/v1/txt2img", "inpaint")["is_using_inpainting_conditioning"] is True
    assert _run(live, "/sdapi/v1/img2img", "inpaint", init_images=init)["is_using_inpainting_conditioning"] is True
    plain = _run(live, "/sdapi/v1/img2img", "sd-v1.5", init_images=init, mask=mask)
    assert plain["is_using_inpainting_conditioning"] is False
    assert _run(live, "/sdapi/v1/txt2img", "sd-v1.5")["is_using_inpainting_conditioning"] is False


def test_sd_model_name_is_the_file_name_without_folders_or_extension(live):
    """A1111: ``name_for_extra = os.path.splitext(os.path.basename(filename))[0]``; a diffusers folder keeps
    its whole name ("sd-v1.5", not "sd-v1")."""
    assert _run(live, "/sdapi/v1/txt2img", "sub/tiny.safetensors")["sd_model_name"] == "tiny"
    assert _run(live, "/sdapi/v1/txt2img", "sd-v1.5")["sd_model_name"] == "sd-v1.5"


def test_subseeds_of_a_real_run_count_up_from_the_subseed_sent(live):
    info = _run(live, "/sdapi/v1/txt2img", "sd-v1.5", subseed=11, batch_size=2)
    assert info["subseed"] == 11 and info["all_subseeds"] == [11, 12] and info["all_seeds"] == [1, 2]


def test_resize_mode_3_runs_through_the_api(live):
    init = [_b64(_gradient(100, 70))]
    info = _run(live, "/sdapi/v1/img2img", "sd-v1.5", init_images=init, resize_mode=3, width=72, denoising_strength=0.6)
    assert "Size: 72x64" in info["infotexts"][0] and "Denoising strength: 0.6" in info["infotexts"][0]


def test_images_carry_no_server_paths(live, tmp_path_factory):
    """A1111's PNGs carry only the infotext; latentforge's own record (``latentforge`` text) is kept for exact
    reruns, with the server's paths (the model's source here) cut to file names."""
    import json

    body = {**OK, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "sub/tiny.safetensors"}}
    r = live.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    text = png.info["latentforge"]
    record = json.loads(text)
    assert record["model"]["source"] == "tiny.safetensors"
    assert os.sep + "sub" + os.sep not in text and "pytest" not in text


def test_other_image_changing_settings_are_refused_by_name_or_applied(client):
    """A1111 1.10's compatibility options, emphasis mode, approximate VAE and padded conds change its images;
    they were accepted and ignored. At A1111's defaults they pass; other values are a 400 naming them, in a
    request and in POST options. A true/false setting given another type is refused, not read as false.
    The SDXL refiner's aesthetic scores fill the request's fields."""
    defaults = {"use_old_emphasis_implementation": False, "emphasis": "Original", "sd_vae_decode_method": "Full",
                "pad_cond_uncond": False, "use_old_scheduling": False, "comma_padding_backtrack": 20}  # fmt: skip
    _ok(client.post("/sdapi/v1/txt2img", json={**OK, "override_settings": defaults}))
    _ok(client.post("/sdapi/v1/options", json=defaults))
    for name, value in (
        ("use_old_emphasis_implementation", True),
        ("emphasis", "No norm"),
        ("sd_vae_decode_method", "TAESD"),
        ("pad_cond_uncond", True),
        ("always_discard_next_to_last_sigma", True),
        ("img2img_fix_steps", "yes"),
    ):
        r = client.post("/sdapi/v1/txt2img", json={**OK, "override_settings": {name: value}})
        assert r.status_code == 400 and name in r.text, (name, r.text)
        r = client.post("/sdapi/v1/options", json={name: value})
        assert r.status_code == 400 and name in r.text, (name, r.text)
    body = {**OK, "override_settings": {"sdxl_refiner_high_aesthetic_score": 7.0}}
    _ok(client.post("/sdapi/v1/txt2img", json=body))
    assert client.queue.submitted[-1].request.aesthetic_score == 7.0


def test_img2img_settings_apply_or_are_refused_by_name(client):
    """A1111 reads inpainting_mask_weight only from its settings (``getattr(self, "inpainting_mask_weight",
    shared.opts.inpainting_mask_weight)``): it reaches every img2img request, masked or not. Colour correction,
    another background colour, an img2img upscaler, extra noise and fixed img2img steps change A1111's images;
    latentforge runs none of them, so a value other than A1111's default is a 400 naming the setting, never
    dropped; fixed img2img steps run."""
    init = [_b64(_gradient(64, 64))]
    mask = _b64(Image.new("L", (64, 64), 255))
    body = {**OK, "init_images": init, "mask": mask, "override_settings": {"inpainting_mask_weight": 0.4}}
    _ok(client.post("/sdapi/v1/img2img", json=body))
    assert client.queue.submitted[-1].request.inpainting_mask_weight == 0.4
    body = {**OK, "init_images": init, "override_settings": {"inpainting_mask_weight": 0.3}}
    _ok(client.post("/sdapi/v1/img2img", json=body))  # without a mask too (A1111: any inpainting-model img2img)
    assert client.queue.submitted[-1].request.inpainting_mask_weight == 0.3
    defaults = {"img2img_color_correction": False, "img2img_background_color": "#ffffff", "img2img_fix_steps": False}
    _ok(client.post("/sdapi/v1/img2img", json={**OK, "init_images": init, "override_settings": defaults}))
    for name, value in (
        ("img2img_color_correction", True),
        ("img2img_background_color", "#000000"),
        ("upscaler_for_img2img", "R-ESRGAN 4x+"),
        ("img2img_extra_noise", 0.2),
    ):
        r = client.post("/sdapi/v1/img2img", json={**OK, "init_images": init, "override_settings": {name: value}})
        assert r.status_code == 400 and name in r.text, (name, r.text)
        r = client.post("/sdapi/v1/options", json={name: value})  # not kept, to fail every img2img later
        assert r.status_code == 400 and name in r.text, (name, r.text)
    _ok(client.post("/sdapi/v1/options", json=defaults))
    fixed = {**OK, "init_images": init, "override_settings": {"img2img_fix_steps": True}}
    _ok(client.post("/sdapi/v1/img2img", json=fixed))  # "With img2img, do exactly the amount of steps ..."
    assert client.queue.submitted[-1].request.img2img_fix_steps is True
