"""Slow server checks (`-m slow`): 50 jobs from 8 clients at once, and process memory (RSS) over repeated
model switches, which must stay flat: switching frees the old model. The numbers are printed (-s)."""

from __future__ import annotations

import base64
import io
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

import latentforge
from latentforge.demo import bundled_model_path
from serverproc import Server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")]


def test_fifty_jobs_from_eight_clients(tmp_path):
    s = Server(tmp=tmp_path)
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    got, errors = {}, []

    def client(ids):
        for i in ids:
            body = {"prompt": f"job {i}", "seed": 1000 + i, "steps": 3, "width": 64, "height": 64}
            r = s.post("/sdapi/v1/txt2img", {**body, "sampler_name": "Euler a"})
            if r.status_code != 200:
                errors.append(r.text)
            else:
                got[i] = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))

    try:
        threads = [threading.Thread(target=client, args=(list(range(50))[k::8],)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
    finally:
        s.close()
    assert not errors and sorted(got) == list(range(50))
    for i in range(0, 50, 7):
        ref = pipe.txt2img(f"job {i}", seed=1000 + i, steps=3, width=64, height=64, sampler="Euler a")
        assert np.array_equal(got[i], np.asarray(ref.images[0].convert("RGB")))


def test_rss_stays_flat_over_model_switches(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        shutil.copy(bundled_model_path(), models / f"{name}.safetensors")
    s = Server("--models-dir", str(models), "--max-models", "1", tmp=tmp_path)
    rss = []
    try:
        for i in range(30):
            name = "a" if i % 2 == 0 else "b"
            body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": i}
            r = s.post("/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": name}})
            assert r.status_code == 200, r.text
            rss.append(s.get("/sdapi/v1/memory").json()["ram"]["process_rss"] / 2**20)
    finally:
        s.close()
    print(f"\nRSS (MiB) after switches 1, 5, 10, 20, 30: {[round(rss[i], 1) for i in (0, 4, 9, 19, 29)]}")
    model_mib = (models / "a.safetensors").stat().st_size * 2 / 2**20  # fp16 on disk, fp32 loaded
    # after warm-up, 20 more switches grow the process by less than one loaded model
    assert rss[-1] - rss[9] < model_mib, (rss, model_mib)
