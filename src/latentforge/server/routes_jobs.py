"""latentforge's jobs extension, ``/latentforge/v1/jobs``: submit without waiting, query, await, stream
progress (Server-Sent Events) and cancel.

- ``POST /latentforge/v1/jobs`` body ``{"mode": "txt2img" | "img2img", ...A1111 payload fields}`` ->
  202 ``{"id", "state", ...}`` (``force_task_id`` chooses the id).
- ``GET /latentforge/v1/jobs/{id}?wait=S`` -> the job (state, progress, step, seeds, infotexts, error, ``batch``:
  how many queued jobs ran in its batch);
  ``wait`` blocks up to S seconds for it to finish; a finished job also carries A1111's response
  (``images``, ``parameters``, ``info``).
- ``GET /latentforge/v1/jobs/{id}/events`` -> ``text/event-stream``: a ``progress`` event (the job as
  above with ``current_image``, a base64 PNG preview) at every change, then one ``done`` event.
- ``DELETE /latentforge/v1/jobs/{id}`` -> removes a queued job or stops a running one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from latentforge.server import sdapi
from latentforge.server.config import ServerConfig
from latentforge.server.errors import ApiError
from latentforge.server.jobs import Job, JobQueue, make_spec
from latentforge.server.models import ModelCatalog

MAX_WAIT = 600.0
KEEP_ALIVE = 15.0  # seconds between an event stream's comments while nothing changes


async def _until(job: Job, ready: Callable[[], bool], timeout: float) -> bool:
    """Whether ``ready()`` became true within ``timeout`` seconds: woken by the job's changes (the worker
    calls back into this event loop), no thread waits."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def notify() -> None:
        loop.call_soon_threadsafe(changed.set)

    job.watch(notify)
    try:
        deadline = loop.time() + timeout
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):  # (not the builtin one before 3.11)
                await asyncio.wait_for(changed.wait(), left)
            changed.clear()
        return True
    finally:
        job.unwatch(notify)


def add_job_routes(
    app: FastAPI, queue: JobQueue, catalog: ModelCatalog, config: ServerConfig, options: dict, respond
) -> None:
    """Register the routes (``respond(job, payload)`` builds A1111's response of a finished job)."""

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise ApiError(
                404, f"no job with id {job_id!r} (finished jobs are kept for a while only)", "id", "NotFound"
            )
        return job

    def view(job: Job, preview: bool = False) -> dict:
        data = job.summary(preview=preview)
        if job.done and job.spec.kind not in ("load", "unload") and job.state != "failed":
            data.update(respond(job, job.spec.payload))
        return data

    @app.post("/latentforge/v1/jobs", status_code=202)
    def submit(body: dict[str, Any]) -> dict:
        mode = body.pop("mode", "txt2img")
        if mode not in ("txt2img", "img2img"):
            raise ApiError(400, f"mode must be 'txt2img' or 'img2img', got {mode!r}", "mode")
        model_cls = sdapi.Img2ImgPayload if mode == "img2img" else sdapi.Txt2ImgPayload
        try:
            payload = model_cls.model_validate(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        req, init, model, vae = sdapi.server_request(payload, img2img=mode == "img2img", options=options, config=config)
        spec = make_spec(catalog, mode, req, init, model, payload, vae)
        spec.save_to = Path(config.outdir).resolve() if payload.save_images else None
        job = queue.submit(spec, payload.force_task_id or None)
        return job.summary(preview=False)

    @app.get("/latentforge/v1/jobs/{job_id}")
    async def get(job_id: str, wait: float = 0.0) -> dict:
        # async: a waiting client holds no worker thread (a hundred long polls starved every other route)
        job = find(job_id)
        if wait > 0:
            await _until(job, lambda: job.done, min(wait, MAX_WAIT))
        return await anyio.to_thread.run_sync(view, job)  # images to base64 off the event loop

    @app.delete("/latentforge/v1/jobs/{job_id}")
    def cancel(job_id: str) -> dict:
        find(job_id)
        job = queue.cancel(job_id)
        return job.summary(preview=False)

    @app.get("/latentforge/v1/jobs/{job_id}/events")
    def events(job_id: str):
        job = find(job_id)

        async def stream():  # async, as ``get``: an open stream holds no worker thread
            version = -1
            while True:
                changed = await _until(job, lambda v=version: job.version != v or job.done, KEEP_ALIVE)
                if not changed:
                    yield ": keep-alive\n\n"
                    continue
                data = job.summary(preview=True)
                version = data["version"]
                if job.done:
                    done = await anyio.to_thread.run_sync(view, job)
                    yield f"event: done\ndata: {json.dumps(done)}\n\n"
                    return
                yield f"event: progress\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
