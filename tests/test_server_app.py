"""The server's request checks in process (FastAPI's TestClient, no model, no worker): a stub queue
finishes every job at once with no images, so a test sees what a request would cost and what the
response to it is, in milliseconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from latentforge.server.app import create_app
from latentforge.server.config import ServerConfig
from latentforge.server.jobs import Job

OK = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
JSON = {"Content-Type": "application/json"}


class StubQueue:
    """What the routes use of ``JobQueue``: every job submitted is done at once (no images)."""

    default_model = None
    current = last = None

    def __init__(self):
        self.submitted = []

    def submit(self, spec, job_id=None):
        self.submitted.append(spec)
        return Job(job_id or f"job{len(self.submitted)}", spec, state="done")

    def pending(self) -> int:
        return 0


@pytest.fixture
def client():
    queue = StubQueue()
    c = TestClient(create_app(ServerConfig(), queue=queue), raise_server_exceptions=False)
    c.queue = queue
    return c


def _post(c, path: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(path, content=data, headers=JSON)


def _error(r, status: int, field: str, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field, body
    for w in words:
        assert w in body["detail"], body["detail"]
    return body["detail"]


# (field, JSON text of the value, words the message holds): values the hires pass refuses
HIRES_FIELDS = [
    ("hr_scale", "NaN", "hr_scale must be above 0 and at most 8"),
    ("hr_scale", '"nan"', "hr_scale must be above 0 and at most 8"),  # pydantic reads the string as a float
    ("hr_scale", "Infinity", "hr_scale must be above 0 and at most 8"),
    ("hr_scale", '"-Infinity"', "hr_scale must be above 0 and at most 8"),
    ("hr_scale", "1e308", "hr_scale must be above 0 and at most 8"),
    ("hr_second_pass_steps", "1" + "0" * 30, "hr_second_pass_steps must be 0 (same as steps) to 1000"),
    ("hr_resize_x", "100000000000000000000", "hr_resize_x must be 0 (unused) or 64 to 8192"),
    ("hr_resize_y", "-5", "hr_resize_y must be 0 (unused) or 64 to 8192"),
    ("denoising_strength", "NaN", "denoising_strength must be between 0 and 1"),
    ("denoising_strength", "5", "denoising_strength must be between 0 and 1"),
]


@pytest.mark.parametrize("field, value, words", HIRES_FIELDS)
def test_hires_fields_are_checked_with_hires_off_as_with_it_on(client, field, value, words):
    """NaN and huge numbers there were taken unchecked and the job ran (the echoed NaN came back as null,
    and as non-JSON ``NaN`` in the jobs event stream). Now they get the 400 the hires pass gives, and no
    job runs."""
    base = json.dumps({**OK, "enable_hr": False})[:-1]
    off = _error(_post(client, "/sdapi/v1/txt2img", f'{base}, "{field}": {value}}}'.encode()), 400, field, words)
    assert "enable_hr is false" in off
    on = base.replace('"enable_hr": false', '"enable_hr": true')
    _error(_post(client, "/sdapi/v1/txt2img", f'{on}, "{field}": {value}}}'.encode()), 400, field, words)
    # the jobs extension shares the check
    jobs = f'{base}, "mode": "txt2img", "{field}": {value}}}'.encode()
    _error(_post(client, "/latentforge/v1/jobs", jobs), 400, field, words)
    assert client.queue.submitted == []


def test_hires_fields_of_the_wrong_type_are_a_422_either_way(client):
    for hr in (False, True):
        r = _post(client, "/sdapi/v1/txt2img", {**OK, "enable_hr": hr, "hr_scale": "twice"})
        assert r.status_code == 422 and "hr_scale" in r.json()["detail"], r.text
    assert client.queue.submitted == []


def test_values_ignored_with_hires_off_stay_ignored(client):
    """In range, the hr_* fields of a request without enable_hr change nothing (A1111 ignores them)."""
    body = {**OK, "hr_scale": 8, "hr_upscaler": "anything", "hr_resize_x": 64, "denoising_strength": 0.0}
    r = _post(client, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["hr_scale"] == 8
    (spec,) = client.queue.submitted
    assert spec.request.hires is None


def test_the_img2img_noise_multiplier_setting_stays_out_of_txt2img_records(client):
    """A1111 applies initial_noise_multiplier in img2img's sample only: a txt2img job's request (and so its
    JSON record) does not carry the server setting."""
    assert _post(client, "/sdapi/v1/options", {"initial_noise_multiplier": 0.5}).status_code == 200
    assert _post(client, "/sdapi/v1/txt2img", OK).status_code == 200
    (spec,) = client.queue.submitted
    assert spec.request.initial_noise_multiplier == 1.0


@pytest.mark.parametrize(("device", "source"), [(None, "CPU"), ("cpu", "CPU"), ("cuda", "GPU"), ("cuda:1", "GPU")])
def test_the_default_noise_source_is_a1111s_on_the_servers_device(device, source):
    """A1111's default randn_source "GPU" draws with torch.randn on its device: CUDA's generator on a GPU (our
    "GPU"), the CPU's on a CPU-only machine (our "CPU"; our "GPU" there emulates CUDA's noise instead). A
    client's own choice still wins. (The app is built, not started: no model loads on the device.)"""
    queue = StubQueue()
    c = TestClient(create_app(ServerConfig(device=device), queue=queue), raise_server_exceptions=False)
    assert c.get("/sdapi/v1/options").json()["randn_source"] == source
    assert _post(c, "/sdapi/v1/txt2img", OK).status_code == 200
    assert queue.submitted[-1].request.rng == source
    other = {"CPU": "NV", "GPU": "CPU"}[source]
    assert _post(c, "/sdapi/v1/txt2img", {**OK, "override_settings": {"randn_source": other}}).status_code == 200
    assert queue.submitted[-1].request.rng == other


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
def test_nan_in_any_field_is_a_400_before_the_job_runs(client, path):
    """Fields the request does not use (other tools', img2img's image_cfg_scale) are echoed in the response:
    a NaN there was taken, the job ran, and the echo was null (or non-JSON ``NaN`` in the event stream)."""
    image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVQI12P4DwABAQEAG7buVgAAAABJRU5ErkJggg=="
    base = json.dumps({**OK, "init_images": [image]} if "img2img" in path else OK)[:-1]
    r = _post(client, path, f'{base}, "my_tool": {{"ratio": [1, NaN]}}}}'.encode())
    _error(r, 400, "my_tool.ratio[1]", "NaN and Infinity", "finite number")
    if "img2img" in path:
        r = _post(client, path, f'{base}, "image_cfg_scale": -Infinity}}'.encode())
        _error(r, 400, "image_cfg_scale", "finite number")
    assert client.queue.submitted == []


ORIGIN = "https://ui.example"


class BrokenQueue(StubQueue):
    def submit(self, spec, job_id=None):
        raise RuntimeError("a bug in the worker")


@pytest.fixture
def cors():
    config = ServerConfig(max_body_bytes=4096)
    app = create_app(config, users=[("u", "pw")], cors_origins=[ORIGIN], queue=BrokenQueue())
    return TestClient(app, raise_server_exceptions=False)


def _cors_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers.get("access-control-allow-origin") == ORIGIN, dict(r.headers)
    for w in words:
        assert w in r.json()["detail"]


def test_cors_headers_on_the_guards_errors_and_500s(cors):
    """The Guard sat outside the CORS middleware, and Starlette's 500 handler outside both: a browser
    client got these errors without Access-Control-Allow-Origin and could not read them."""
    auth = {"Origin": ORIGIN, "Authorization": "Basic dTpwdw==", **JSON}  # u:pw
    _cors_error(cors.get("/sdapi/v1/options", headers={"Origin": ORIGIN}), 401, "authentication required")
    big = json.dumps({**OK, "prompt": "x" * 5000}).encode()
    _cors_error(cors.post("/sdapi/v1/txt2img", content=big, headers=auth), 413, "4096 bytes")
    _cors_error(cors.post("/sdapi/v1/txt2img", content=b'{"steps": 2,}', headers=auth), 422, "not valid JSON")
    _cors_error(cors.post("/sdapi/v1/txt2img", content=b'{"prompt": "\xff"}', headers=auth), 400, "UTF-8")
    r = cors.post("/sdapi/v1/txt2img", content=json.dumps(OK).encode(), headers=auth)
    _cors_error(r, 500, "server log")
    assert "a bug in the worker" not in r.text
    # the routes' own errors had them already, and still do; other origins get none
    _cors_error(cors.post("/sdapi/v1/txt2img", content=b'{"steps": "many"}', headers=auth), 422, "steps")
    r = cors.get("/sdapi/v1/options", headers={**auth, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_preflight_needs_no_password(cors):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = cors.options("/sdapi/v1/txt2img", headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    'oil,"{prompt}, oil painting",blurry\n'
    "sig,signature,\n"
    '"far off","<lora:/etc/passwd:1>",\n'
)


@pytest.fixture
def styled(tmp_path):
    (tmp_path / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    queue = StubQueue()
    config = ServerConfig(styles_files=[tmp_path / "styles.csv"])
    c = TestClient(create_app(config, queue=queue), raise_server_exceptions=False)
    c.queue = queue
    return c


def test_saved_styles_apply_in_order_as_a1111(styled):
    """A1111's rules (modules/styles.py): a style with {prompt} puts the prompt there, one without is
    appended after ", "; styles apply in the order named, to the negative prompt too, and to the hires
    pass's own prompt. The expected texts are written out by hand from those rules."""
    listed = styled.get("/sdapi/v1/prompt-styles").json()
    assert listed[0] == {"name": "oil", "prompt": "{prompt}, oil painting", "negative_prompt": "blurry"}
    assert [s["name"] for s in listed] == ["oil", "sig", "far off"]
    body = {**OK, "prompt": "a cat", "negative_prompt": "", "styles": ["oil", "sig"]}
    body.update(enable_hr=True, hr_prompt="a dog", denoising_strength=0.5)
    r = _post(styled, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    (spec,) = styled.queue.submitted
    assert spec.request.prompt == "a cat, oil painting, signature"
    assert spec.request.negative_prompt == "blurry"
    assert spec.request.hires.prompt == "a dog, oil painting, signature"
    assert json.loads(r.json()["info"])["styles"] == ["oil", "sig"]
    _post(styled, "/sdapi/v1/txt2img", {**OK, "prompt": "a cat", "styles": ["sig", "oil"]})
    assert styled.queue.submitted[-1].request.prompt == "a cat, signature, oil painting"


def test_unknown_styles_and_styles_naming_paths_are_refused(styled, client):
    _error(_post(styled, "/sdapi/v1/txt2img", {**OK, "styles": ["oill"]}), 400, "styles", "unknown style", "oil")
    r = _post(styled, "/sdapi/v1/txt2img", {**OK, "styles": ["far off"]})
    assert r.status_code == 400 and "path" in r.json()["detail"], r.text
    _error(_post(client, "/sdapi/v1/txt2img", {**OK, "styles": ["oil"]}), 400, "styles", "no styles")
    assert styled.queue.submitted == [] and client.queue.submitted == []


def test_styles_csv_of_an_a1111_installation_is_read_by_default(tmp_path):
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    config = ServerConfig(models_dir=tmp_path / "models" / "Stable-diffusion")
    assert config.styles() == {}  # a fresh installation has no styles.csv
    (tmp_path / "styles.csv").write_text(STYLES_CSV, encoding="utf-8-sig")  # A1111 writes a BOM
    assert list(config.styles()) == ["oil", "sig", "far off"]


def test_a_damaged_styles_file_is_named_without_the_servers_folders(tmp_path):
    tmp_path = tmp_path / "My Styles"  # a folder name with a space
    tmp_path.mkdir()
    (tmp_path / "styles.csv").write_text('name,prompt\nbad,"unclosed\n', encoding="utf-8")
    queue = StubQueue()
    c = TestClient(create_app(ServerConfig(styles_files=[tmp_path / "styles.csv"]), queue=queue))
    for r in (c.get("/sdapi/v1/prompt-styles"), _post(c, "/sdapi/v1/txt2img", {**OK, "styles": ["bad"]})):
        assert r.status_code in (400, 500) and "styles.csv" in r.json()["detail"], r.text
        assert str(tmp_path) not in r.text and "My Styles" not in r.text
    assert queue.submitted == []


def test_refiner_with_hires_is_refused_before_any_model_loads(client):
    """Review finding: the worker loaded (and evicted) up to three models before the refiner refused Hires.
    fix; the request's own checks refuse the pair now, before a job exists."""
    body = {**OK, "enable_hr": True, "refiner_checkpoint": "x.safetensors", "refiner_switch_at": 0.8}
    r = _post(client, "/sdapi/v1/txt2img", body)
    assert r.status_code == 400 and "refiner together with Hires. fix" in r.json()["detail"], r.text
    assert client.queue.submitted == []


def test_interrogate_says_it_is_not_available(client):
    r = _post(client, "/sdapi/v1/interrogate", {"image": "", "model": "clip"})
    assert r.status_code == 501 and "interrogate" in r.json()["detail"] and "png-info" in r.json()["detail"]


def test_embeddings_are_listed_as_a1111_lists_them(tmp_path):
    """A1111's /sdapi/v1/embeddings: for each embedding its step and checkpoint (as its .pt records them),
    "shape" (the width; an SDXL pair's two widths added) and "vectors"; with a model loaded, those that do not
    fit it under "skipped". A file that cannot be read is left out."""
    import types

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(3, 768)
    torch.save({"string_to_param": {"*": vectors}, "name": "shiny", "step": 1500, "sd_checkpoint": "a1b2c3d4",
                "sd_checkpoint_name": "v1-5-pruned"}, folder / "shiny.pt")  # fmt: skip
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, folder / "pair.safetensors")
    (folder / "damaged.pt").write_bytes(b"not a pickle")
    config = ServerConfig(embedding_dirs=[folder])
    listing = TestClient(create_app(config, queue=StubQueue())).get("/sdapi/v1/embeddings").json()
    expected = {
        "loaded": {
            "shiny": {
                "step": 1500,
                "sd_checkpoint": "a1b2c3d4",
                "sd_checkpoint_name": "v1-5-pruned",
                "shape": 768,
                "vectors": 3,
            },
            "pair": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048, "vectors": 2},
        },
        "skipped": {},
    }
    listing["loaded"].pop("scarlet")  # the bundled demo embedding (64 wide), listed too: it fits the demo model
    assert listing == expected
    # an SD1 model loaded: the SDXL pair does not fit it
    queue = StubQueue()
    queue.default_model = "sd1"
    sd1 = types.SimpleNamespace(text=types.SimpleNamespace(slots=[("clip-l", 768)]))
    queue.cache = types.SimpleNamespace(loaded={"sd1": sd1})
    listing = TestClient(create_app(config, queue=queue)).get("/sdapi/v1/embeddings").json()
    assert set(listing["loaded"]) == {"shiny"} and set(listing["skipped"]) == {"pair", "scarlet"}
