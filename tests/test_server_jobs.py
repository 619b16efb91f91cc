"""The jobs extension (/latentforge/v1/jobs) and the queue under the A1111 API: submit, await, stream
progress with previews (SSE), cancel queued and running jobs, skip, force_task_id, a full queue -> 503."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")

from latentforge.demo import bundled_model_path
from serverproc import Server

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")
FAST = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
SLOW = {"prompt": "slow", "steps": 1000, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--queue-size", "2", tmp=tmp_path_factory.mktemp("srv"))
    yield s
    s.close()


def _wait_running(server, job_id, step=2):
    for _ in range(400):
        j = server.get(f"/latentforge/v1/jobs/{job_id}").json()
        if j["state"] == "running" and j["step"] >= step:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start: {j}")


def test_submit_and_await(server):
    r = server.post("/latentforge/v1/jobs", {**FAST, "force_task_id": "task-one", "n_iter": 2})
    assert r.status_code == 202 and r.json()["id"] == "task-one"
    j = server.get("/latentforge/v1/jobs/task-one", params={"wait": 60}).json()
    assert j["state"] == "done" and j["seeds"] == [1, 2] and len(j["images"]) == 2
    assert json.loads(j["info"])["all_seeds"] == [1, 2]
    Image.open(io.BytesIO(base64.b64decode(j["images"][1]))).load()
    # the id is free again once the job finished
    assert server.post("/latentforge/v1/jobs", {**FAST, "force_task_id": "task-one"}).status_code == 202
    assert server.get("/latentforge/v1/jobs/task-one", params={"wait": 60}).json()["state"] == "done"


def test_event_stream_reports_progress_with_previews(server):
    job = server.post("/latentforge/v1/jobs", {**FAST, "steps": 12}).json()
    events = []
    with requests.get(f"{server.url}/latentforge/v1/jobs/{job['id']}/events", stream=True, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "done":
                    break
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "progress" in kinds
    steps = [e["step"] for k, e in events if k == "progress" and e["state"] == "running"]
    assert steps == sorted(steps) and max(steps) == 12
    previews = [e["current_image"] for k, e in events if k == "progress" and e["current_image"]]
    assert previews
    w, h = Image.open(io.BytesIO(base64.b64decode(previews[-1]))).size
    assert w == h and w < 64  # at latent size: a cheap preview, no VAE decode
    assert events[-1][1]["state"] == "done" and len(events[-1][1]["images"]) == 1


def test_cancel_running_and_queued_jobs_and_a_full_queue(server):
    running = server.post("/latentforge/v1/jobs", SLOW).json()["id"]
    _wait_running(server, running)
    queued = [server.post("/latentforge/v1/jobs", SLOW).json()["id"] for _ in range(2)]
    full = server.post("/latentforge/v1/jobs", SLOW)
    assert full.status_code == 503 and int(full.headers["Retry-After"]) > 0 and "full" in full.json()["detail"]
    assert server.post("/sdapi/v1/txt2img", FAST).status_code == 503  # the A1111 API shares the queue
    assert server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 3
    assert server.delete(f"/latentforge/v1/jobs/{queued[1]}").json()["state"] == "cancelled"
    server.delete(f"/latentforge/v1/jobs/{running}")
    j = server.get(f"/latentforge/v1/jobs/{running}", params={"wait": 60}).json()
    assert j["state"] == "cancelled" and j["step"] < 1000
    _wait_running(server, queued[0])
    server.delete(f"/latentforge/v1/jobs/{queued[0]}")
    assert server.get(f"/latentforge/v1/jobs/{queued[0]}", params={"wait": 60}).json()["state"] == "cancelled"
    assert server.post("/sdapi/v1/txt2img", FAST).status_code == 200


def test_skip_drops_one_pass_and_interrupt_keeps_finished_passes(server):
    job = server.post("/latentforge/v1/jobs", {**SLOW, "steps": 200, "n_iter": 3, "seed": 10}).json()["id"]
    _wait_running(server, job)
    assert server.post("/sdapi/v1/skip").json() == {}
    for _ in range(400):  # the second pass runs
        j = server.get(f"/latentforge/v1/jobs/{job}").json()
        if j["iteration"] == 1 and j["step"] >= 2:
            break
        time.sleep(0.05)
    assert j["iteration"] == 1
    results = {}
    t = threading.Thread(target=lambda: results.update(j=server.get(f"/latentforge/v1/jobs/{job}?wait=120").json()))
    t.start()
    time.sleep(0.2)
    # let the second pass finish, then interrupt the third
    for _ in range(2000):
        now = server.get(f"/latentforge/v1/jobs/{job}").json()
        if now["iteration"] >= 2 and now["step"] >= 2:
            break
        time.sleep(0.05)
    server.post("/sdapi/v1/interrupt")
    t.join(120)
    j = results["j"]
    # A1111: a skipped or interrupted pass still gives its image, its last denoised estimate decoded
    assert j["state"] == "interrupted" and j["seeds"] == [10, 11, 12]  # pass 0 skipped, pass 2 interrupted
    assert len(j["images"]) == 3 and [f"Seed: {s}," in t for s, t in zip((10, 11, 12), j["infotexts"])] == [True] * 3


def test_many_waiting_clients_do_not_starve_the_other_routes(server):
    """GET /jobs/{id}?wait=S held a worker thread for up to S seconds: with more waiting clients than the
    server's threads (--queue-size 2: 26), /sdapi/v1/progress waited for them."""
    job = server.post("/latentforge/v1/jobs", SLOW).json()["id"]
    _wait_running(server, job)
    done = []

    def wait():
        r = requests.get(f"{server.url}/latentforge/v1/jobs/{job}", params={"wait": 20}, timeout=60)
        done.append(r.status_code)

    waiters = [threading.Thread(target=wait) for _ in range(40)]
    for t in waiters:
        t.start()
    time.sleep(1.0)  # every waiter is in
    start = time.monotonic()
    assert server.get("/sdapi/v1/progress").status_code == 200
    assert server.get("/sdapi/v1/options").status_code == 200
    took = time.monotonic() - start
    server.delete(f"/latentforge/v1/jobs/{job}")
    for t in waiters:
        t.join(60)
    assert done == [200] * 40
    assert took < 10, f"the other routes waited {took:.1f} s behind the long polls"


def test_queued_input_images_are_bounded_and_let_go(tmp_path):
    """Each request may bring 8 images at --max-image-pixels, and up to --queue-size jobs wait: their
    decoded images were held until the job left the history (a full queue: about 32 GB at the
    defaults). Unfinished jobs now hold at most two requests' worth; finished ones hold none."""
    s = Server("--queue-size", "64", "--max-image-pixels", str(64 * 64), tmp=tmp_path)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        body = {**FAST, "mode": "img2img", "init_images": [image] * 8, "batch_size": 8}
        running = s.post("/latentforge/v1/jobs", SLOW).json()["id"]
        _wait_running(s, running)
        queued = [s.post("/latentforge/v1/jobs", body) for _ in range(3)]
        assert [r.status_code for r in queued] == [202, 202, 503], [r.text for r in queued]
        assert "input images already hold 65536 of the 65536 pixels" in queued[2].json()["detail"]
        assert int(queued[2].headers["Retry-After"]) > 0
        for r in queued[:2]:
            s.delete(f"/latentforge/v1/jobs/{r.json()['id']}")
        s.delete(f"/latentforge/v1/jobs/{running}")
        again = s.post("/latentforge/v1/jobs", body)  # the cancelled jobs let their images go
        assert again.status_code == 202, again.text
        done = s.get(f"/latentforge/v1/jobs/{again.json()['id']}", params={"wait": 120}).json()
        assert done["state"] == "done" and len(done["images"]) == 8
        assert s.post("/latentforge/v1/jobs", body).status_code == 202  # and so did the finished one
    finally:
        s.close()


def test_a_finished_job_keeps_no_decoded_inputs():
    """Only the init images were dropped when a job finished: the decoded mask and ControlNet images of
    every job in the history stayed, uncounted by the queue's pixel budget."""
    from latentforge.pipelines.request import ControlUnit, GenerationRequest, InpaintOptions
    from latentforge.server.jobs import Job, JobSpec, input_pixels, let_go_of_inputs

    mask, hint = Image.new("L", (64, 64)), Image.new("RGB", (32, 32))
    req = GenerationRequest(prompt="x", inpaint=InpaintOptions(mask=mask), control=[ControlUnit(model="m", image=hint)])
    job = Job("j", JobSpec("img2img", request=req, init_images=[Image.new("RGB", (64, 64))]))
    job.request = req
    assert input_pixels(job.spec) == 64 * 64 * 2 + 32 * 32
    let_go_of_inputs(job)
    for r in (job.spec.request, job.request):
        assert r.inpaint is not None and r.inpaint.mask is None and r.control[0].image is None
        assert r.control[0].model == "m" and r.prompt == "x"
    assert job.spec.init_images is None and input_pixels(job.spec) == 0
