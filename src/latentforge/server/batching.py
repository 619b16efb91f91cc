"""Batching of queued jobs: the worker takes the oldest job and, with it, the later queued jobs that can run
in the same batch (``pipelines.batch``: the same model and every setting but prompts, seeds and batch size),
up to ``--max-batch`` images.

Order: the oldest job always runs next, so no job is overtaken indefinitely; jobs taken into its batch only
move forward, and the jobs that cannot share keep their order. A job that switches the default model
(``load``) is a barrier: no job behind it joins a batch before it, since "the default model" may mean another
model after it. In a batch each job keeps its own progress, previews, cancel (a cancelled job's image is
dropped, the batch stops only when every job in it is cancelled), errors (checked per job before sampling)
and infotext.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from latentforge.pipelines.batch import BatchMember, batch_key, generate_batch
from latentforge.pipelines.generate import GenerationResult, Interrupted
from latentforge.pipelines.request import RequestError

# jobs.py imports this module, so its types are named here only in words (Job, JobQueue of jobs.py)
Job = Any
JobQueue = Any

log = logging.getLogger("latentforge.server")


def job_key(job: Job, default_model: str | None) -> tuple | None:
    """What jobs must share to run together (None: this job runs alone): the model and VAE it will use, the task
    and every request setting but the per-image ones (``pipelines.batch.batch_key``)."""
    spec = job.spec
    if spec.kind not in ("txt2img", "img2img") or spec.request is None:
        return None
    if spec.refiner_model is not None or spec.hires_model is not None:  # another model: generate loads it
        return None
    model = spec.model or default_model
    if model is None:
        return None
    try:
        key = batch_key(spec.request, img2img=spec.kind == "img2img")
    except Exception:  # the worker must not die on a request it cannot compare: it runs alone
        log.exception("job %s: no batch key", job.id)
        return None
    return None if key is None else (model, spec.vae, key)


def take_batch(waiting: deque[Job], head: Job, max_images: int, default_model: str | None) -> list[Job]:
    """Remove from ``waiting`` the jobs that join ``head``'s batch (oldest first, up to ``max_images``
    images in all) and return the batch, ``head`` first. Called with the queue's lock held."""
    batch = [head]
    key = job_key(head, default_model) if max_images > 1 else None
    if key is None:
        return batch
    images = head.spec.request.batch_size
    for job in list(waiting):
        if job.spec.kind in ("load", "unload"):
            break  # a barrier: jobs behind it may mean another default model
        if job.stop_flag or job_key(job, default_model) != key:
            continue
        size = job.spec.request.batch_size
        if images + size > max_images:
            continue  # a smaller job further back may still fit
        waiting.remove(job)
        batch.append(job)
        images += size
        if images >= max_images:
            break
    return batch


def run_batch(queue: JobQueue, jobs: list[Job]) -> None:
    """Run ``jobs`` (from ``take_batch``) as one batch and finish each with its own state."""
    name = jobs[0].spec.model or queue.default_model
    try:
        pipe = queue.cache.get(name, jobs[0].spec.vae)  # the same VAE for all (job_key)
    except Exception as e:  # the model is every job's: each fails with it
        for job in jobs:
            queue.fail(job, e)
        return
    members = []
    vae = pipe.info.vae_source if pipe.info and pipe.info.vae_source != "checkpoint" else None
    for job in jobs:
        job.model_name, job.vae_path = name, vae
        job.inpainting_model = pipe.family.conditioner.kind == "inpaint"  # (jobs.is_inpainting_model)
        job.iteration, job.iterations, job.step = 0, 1, 0
        job.batch = len(jobs)
        members.append(
            BatchMember(
                job.spec.request,
                job.spec.init_images,
                progress=lambda p, job=job: queue._progress(job, p),
                partial=True,  # interrupt and skip keep the image being made, as a job run alone
            )
        )
    queue.stats["batches"] += 1
    queue.stats["batched_jobs"] += len(jobs)
    results = generate_batch(pipe, members, upscaler_dirs=queue.config.upscaler_dirs)
    for job, result in zip(jobs, results):
        if isinstance(result, GenerationResult) and job.cancel_flag:  # DELETE: the image is dropped
            queue.finish(job, "cancelled")
        elif isinstance(result, GenerationResult):
            queue.store(job, result)
            queue.finish(job, "interrupted" if job.stop_flag else "done")
        elif isinstance(result, Interrupted):  # cancelled (or skipped: its only pass dropped)
            queue.finish(job, "cancelled" if job.stop_flag else "done")
        elif isinstance(result, RequestError):
            queue.finish(job, "failed", str(result), "request")
        else:
            queue.fail(job, result)
