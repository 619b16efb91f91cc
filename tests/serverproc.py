"""A real ``latentforge serve`` process on 127.0.0.1 and a free port, for the server tests (and
benchmarks/bench_server_batch.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SRC = Path(__file__).resolve().parents[1] / "src"
# The tests' server: one thread and fp32, so that its pixels are those of the tests' own process.
TEST_ENV = {"OMP_NUM_THREADS": "1", "LATENTFORGE_DTYPE": "fp32"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``latentforge serve --port PORT *args`` with this checkout's sources, started and ready (its progress
    endpoint answers with an empty queue) or an error with its output. ``env``: variables set for it on top
    of this process's (``TEST_ENV`` unless given); ``tmp``: a folder for its log and cache (else the log is
    a temporary file); ``timeout``: seconds it may take to start."""

    def __init__(
        self,
        *args: str,
        auth: tuple[str, str] | None = None,
        tmp: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        env = {**os.environ, **(TEST_ENV if env is None else env)}
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
        if tmp is not None:
            env["XDG_CACHE_HOME"] = str(tmp / "cache")
            self.log = open(tmp / f"server-{self.port}.log", "w+")  # noqa: SIM115 - closed with the process
        else:
            self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "latentforge.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = requests.get(self.url + "/sdapi/v1/progress", auth=self.auth, timeout=2)
                if r.status_code in (200, 401) and r.json()["state"]["job_count"] == 0:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, auth=kw.pop("auth", self.auth), timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, json=None, **kw) -> requests.Response:
        return requests.post(
            self.url + path, json=json, auth=kw.pop("auth", self.auth), timeout=kw.pop("timeout", 300), **kw
        )

    def delete(self, path: str, **kw) -> requests.Response:
        return requests.delete(self.url + path, auth=kw.pop("auth", self.auth), timeout=60, **kw)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def b64_png(image) -> str:
    """A PIL image as the base64 PNG the A1111 API takes."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
