"""The server as a Ray Serve deployment (`-m slow`): one replica on loopback, an A1111 txt2img request
through Ray's proxy gives the same pixels as the Python API."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import latentforge  # noqa: E402
from latentforge.demo import bundled_model_path  # noqa: E402
from latentforge.server.config import ServerConfig  # noqa: E402
from latentforge.server.ray_serve import deployment  # noqa: E402
from serverproc import SRC, free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")]


def test_one_replica_on_loopback(tmp_path):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "LATENTFORGE_DTYPE": "fp32"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, _node_ip_address="127.0.0.1")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(model=Path(bundled_model_path()), outdir=tmp_path)
        serve.run(deployment(config, num_cpus=1), route_prefix="/")
        body = {"prompt": "a red circle", "seed": 4, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
        r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0
    finally:
        serve.shutdown()
        ray.shutdown()
    pipe = latentforge.load(bundled_model_path(), dtype="fp32")
    ref = pipe.txt2img("a red circle", seed=4, steps=3, width=64, height=64, sampler="Euler")
    assert np.array_equal(got, np.asarray(ref.images[0].convert("RGB")))
