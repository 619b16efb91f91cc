"""The job queue behind the server: one worker thread owns the loaded pipelines and runs jobs in order.

HTTP handlers never touch torch: they submit a ``JobSpec`` and wait on (or stream) the ``Job``. The queue
is bounded (``QueueFull`` when full: ``queue_size`` jobs, or input images of more than
``max_queued_pixels`` pixels held by the jobs not yet finished; a finished job lets its input images go);
every job has an id, a state, progress with a cheap preview, and can be cancelled (queued: removed;
running: stopped at the next step). A run of ``batch_count`` passes is executed pass by pass (each with
``batch_count=1`` and the seeds it would have had), so A1111's "skip" and "interrupt" keep the image being
made and "interrupt" the passes already finished. Models are loaded on the worker into the cache of
``models.py``. Queued jobs that can share a batch (same model, size, sampler settings; ``batching.py``)
run together, up to ``max_batch`` images.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from latentforge.io.images import next_free_names, save_png
from latentforge.pipelines.checks import hires_checkpoint
from latentforge.pipelines.generate import GenerationResult, Interrupted, Progress, generate, pick_seeds
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.server.batching import run_batch, take_batch
from latentforge.server.config import ServerConfig
from latentforge.server.models import ModelCache, ModelCatalog
from latentforge.threads import reserve_cores

log = logging.getLogger("latentforge.server")


def _client_errors() -> tuple[type[Exception], ...]:
    from latentforge.adapters.folders import AdapterNotFound
    from latentforge.conditioning.prompt import PromptError
    from latentforge.upscalers import UpscalerNotFound

    return (RequestError, PromptError, AdapterNotFound, UpscalerNotFound)


_CLIENT_ERRORS = _client_errors()


def _file_errors() -> tuple[type[Exception], ...]:
    """A file the request chose (a model, LoRA, embedding, hypernetwork, ControlNet, upscaler, annotator) that
    cannot be used, or a model whose numbers overflow: the library's message says which file and why."""
    from latentforge.adapters.lora_kinds import LoraError
    from latentforge.conditioning.embeddings import EmbeddingError
    from latentforge.families.detect import DetectionError
    from latentforge.io.components import LoadError
    from latentforge.io.safetensors_header import CheckpointError
    from latentforge.models.hed_load import HEDNotFoundError
    from latentforge.models.midas_load import MidasNotFoundError
    from latentforge.pipelines.numerics import NonFiniteError

    return (LoraError, EmbeddingError, CheckpointError, LoadError, DetectionError, NonFiniteError,
            HEDNotFoundError, MidasNotFoundError)  # fmt: skip


_FILE_ERRORS = _file_errors()
# the directories of an absolute path in a message: a client learns the file's name, not where it lives
_DIRECTORIES = re.compile(r"(?<![\w.~-])/(?:[^\s/:'\",;()\[\]]+/)+")


def public_message(text: str) -> str:
    """A library error for a client: paths cut to file names, at most 1000 characters."""
    text = _DIRECTORIES.sub("", text)
    return text if len(text) <= 1000 else text[:990] + " ... (cut)"


def input_pixels(spec: JobSpec) -> int:
    """The decoded pixels a job holds while it waits: init images, the inpainting mask, ControlNet images."""
    req = spec.request
    images = list(spec.init_images or [])
    if req is not None:
        mask = req.inpaint.mask if req.inpaint is not None else None
        images += [mask] if isinstance(mask, Image.Image) else []
        images += [u.get("image") if isinstance(u, dict) else getattr(u, "image", None) for u in req.control or []]
    return sum(im.width * im.height for im in images if isinstance(im, Image.Image))


def let_go_of_inputs(job: Job) -> None:
    """Drop a finished job's decoded inputs: init images, the inpainting mask, ControlNet images (the
    request keeps its other fields, for the response's ``info``)."""
    job.spec.init_images = None
    for owner, name in ((job.spec, "request"), (job, "request")):
        req = getattr(owner, name)
        if req is None:
            continue
        inpaint = req.inpaint
        if inpaint is not None and isinstance(inpaint.mask, Image.Image):
            inpaint = dataclasses.replace(inpaint, mask=None)
        control = [
            {**u, "image": None} if isinstance(u, dict) else dataclasses.replace(u, image=None)
            for u in req.control or []
        ]
        setattr(owner, name, dataclasses.replace(req, inpaint=inpaint, control=control))


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; the client should retry later."""


@dataclass
class JobSpec:
    """What a job runs: ``kind`` is "txt2img", "img2img", "load" (switch the default model), "unload" (free
    every loaded model; the next job loads its model again) or "extras"
    (upscale ``init_images`` with the Extras options in ``payload``)."""

    kind: str
    request: GenerationRequest | None = None
    init_images: list[Image.Image] | None = None
    model: str | None = None  # a catalog name; None: the current default model
    preview_every: float = 0.25  # seconds between previews
    payload: Any = None  # what the client sent (for the response), not used by the worker
    save_to: Path | None = None  # the server's --outdir when the client asked for save_images
    refiner_model: str | None = None  # a catalog name: the worker puts the loaded refiner in the request
    hires_model: str | None = None  # a catalog name: the worker puts the loaded hires pass's model in the request
    vae: str | None = None  # "Automatic", "None" or a VAE file name (ServerConfig.vaes); None: leave it as is


@dataclass
class Job:
    id: str
    spec: JobSpec
    state: str = "queued"  # queued, running, done, failed, cancelled, interrupted
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    request: GenerationRequest | None = None  # as run: the seed chosen, the size resolved
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None  # "request" (the client's fault), "file" (a file it chose is unusable), "internal"
    step: int = 0
    steps: int = 0
    iteration: int = 0
    iterations: int = 0
    preview_png: bytes | None = None
    model_name: str | None = None
    vae_path: str | None = None  # the standalone VAE the job decoded with (None: the checkpoint's own)
    inpainting_model: bool = False  # its model is an inpainting model (A1111's is_using_inpainting_conditioning)
    skip_flag: bool = False
    stop_flag: bool = False
    cancel_flag: bool = False  # stopped by DELETE: the image being made is dropped, not kept as by interrupt
    held: int = 0  # decoded input pixels counted in JobQueue.held_pixels until the job finishes
    version: int = 0  # bumped on every change, for event streams
    batch: int = 1  # jobs that ran in its batch (server/batching.py), itself included
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _last_preview: float = 0.0
    _watchers: list = field(default_factory=list, repr=False)  # called (from the worker's thread) on changes

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled", "interrupted")

    @property
    def fraction(self) -> float:
        if self.done:
            return 1.0
        if not self.steps or not self.iterations:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.steps) / self.iterations)

    def eta(self) -> float:
        if self.started is None or self.fraction <= 0:
            return 0.0
        spent = time.time() - self.started
        return max(0.0, spent / self.fraction - spent)

    def touch(self) -> None:
        with self._cond:
            self.version += 1
            self._cond.notify_all()
            watchers = list(self._watchers)
        for notify in watchers:  # a failing waiter (its event loop gone) must not stop the worker
            try:
                notify()
            except Exception:
                log.debug("a job watcher failed", exc_info=True)

    def watch(self, notify) -> None:
        """Call ``notify()`` at every change until ``unwatch`` (async waiters: no thread blocks on the job)."""
        with self._cond:
            self._watchers.append(notify)

    def unwatch(self, notify) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._watchers.remove(notify)

    def wait(self, timeout: float | None = None, after_version: int | None = None) -> bool:
        """Wait until the job is done (or, with ``after_version``, until anything changed)."""
        with self._cond:
            if after_version is None:
                return self._cond.wait_for(lambda: self.done, timeout)
            return self._cond.wait_for(lambda: self.version != after_version or self.done, timeout)

    def summary(self, *, preview: bool = True) -> dict:
        """The job as JSON for the jobs extension (images are fetched from the result endpoints)."""
        data = {
            "id": self.id,
            "kind": self.spec.kind,
            "state": self.state,
            "progress": round(self.fraction, 4),
            "eta_relative": round(self.eta(), 3),
            "step": self.step,
            "steps": self.steps,
            "iteration": self.iteration,
            "iterations": self.iterations,
            "model": self.model_name or self.spec.model,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "seeds": self.seeds,
            "infotexts": self.infotexts,
            "version": self.version,
            "batch": self.batch,
        }
        if preview:
            data["current_image"] = base64.b64encode(self.preview_png).decode() if self.preview_png else None
        return data


def is_inpainting_model(pipe) -> bool:
    """An inpainting model (9 input channels): A1111 reports ``is_using_inpainting_conditioning`` for its jobs."""
    return getattr(getattr(getattr(pipe, "family", None), "conditioner", None), "kind", None) == "inpaint"


def make_spec(
    catalog: ModelCatalog, kind: str, req: GenerationRequest, init, model: str | None, payload, vae: str | None = None
) -> JobSpec:
    """A job for the worker; model names (the checkpoint, the refiner) resolve through the catalog only, VAE
    names through ``ServerConfig.vaes`` (``sdapi_settings.vae_choice``)."""
    spec = JobSpec(kind, req, init, catalog.resolve(model, "override_settings.sd_model_checkpoint") if model else None)
    spec.payload = payload
    spec.vae = vae
    if getattr(req, "refiner", None) is not None and isinstance(req.refiner.checkpoint, str):
        spec.refiner_model = catalog.resolve(req.refiner.checkpoint, "refiner_checkpoint")
    other = hires_checkpoint(req.hires) if getattr(req, "hires", None) is not None else None
    if isinstance(other, str):
        spec.hires_model = catalog.resolve(other, "hr_checkpoint_name")
    return spec


class JobQueue:
    """Jobs in submission order, one worker thread running them (see the module docstring)."""

    def __init__(self, config: ServerConfig, catalog: ModelCatalog):
        self.config = config
        self.catalog = catalog
        self.cache = ModelCache(catalog, config)
        self.default_model = catalog.default_name()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self.current: Job | None = None  # the oldest running job (the head of its batch)
        self.running: list[Job] = []  # every job of the running batch
        self.last: Job | None = None
        self.stats = {"batches": 0, "batched_jobs": 0}  # runs of more than one job, and their jobs
        self.held_pixels = 0  # decoded input pixels of the jobs not yet finished (each job's in Job.held)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="latentforge-worker", daemon=True)

    def start(self) -> JobQueue:
        reserve_cores(1)  # the HTTP side keeps a core where there are 3 or more (threads.choose_threads)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self.finish(job, "cancelled", error="the server is shutting down")
            self._waiting.clear()
            for job in self.running:
                job.stop_flag = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- submitting and querying (any thread)
    def submit(self, spec: JobSpec, job_id: str | None = None) -> Job:
        job_id = job_id or uuid.uuid4().hex
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if job_id in self.jobs and not self.jobs[job_id].done:
                raise RequestError(f"force_task_id: a job with id {job_id!r} is already queued or running")
            if len(self._waiting) >= self.config.queue_size:
                raise QueueFull(f"the queue is full ({self.config.queue_size} waiting jobs); retry later")
            pixels, limit = input_pixels(spec), self.config.max_queued_pixels
            if self.held_pixels and self.held_pixels + pixels > limit:
                raise QueueFull(
                    f"the queued jobs' input images already hold {self.held_pixels} of the {limit} pixels the server "
                    f"keeps at once (this request brings {pixels}); retry later"
                )
            job = Job(job_id, spec)
            self.held_pixels += pixels
            job.held = pixels
            self.jobs.pop(job_id, None)
            self.jobs[job_id] = job
            self._waiting.append(job)
            self._trim()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self.jobs.get(job_id)

    def pending(self) -> int:
        """Jobs waiting plus the one running (A1111's job_count)."""
        with self._cond:
            return len(self._waiting) + len(self.running)

    def cancel(self, job_id: str) -> Job | None:
        """Remove a queued job, or stop a running one at its next step (in a batch: that job only)."""
        with self._cond:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job in self._waiting:
                self._waiting.remove(job)
                self.finish(job, "cancelled")
            elif job in self.running:
                job.stop_flag = job.cancel_flag = True
        return job

    def interrupt(self) -> None:
        """A1111's interrupt: stop the running job (every job of a batch), keeping the images it finished."""
        with self._cond:
            for job in self.running:
                job.stop_flag = True

    def skip(self) -> None:
        """A1111's skip: drop the running job's current pass (of every job in a batch) and go on with the next."""
        with self._cond:
            for job in self.running:
                job.skip_flag = True

    def _trim(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.done]
        for key in finished[: max(0, len(finished) - self.config.history)]:
            del self.jobs[key]

    def finish(self, job: Job, state: str, error: str | None = None, kind: str | None = None) -> None:
        """Set a job's final state (and error: ``kind`` "request" is the client's fault, "internal" ours)."""
        with self._cond:  # done and its pixels given back at once: a resubmitted id finds both settled
            job.state = state
            job.error = error
            job.error_kind = kind
            job.finished = time.time()
            self.held_pixels -= job.held
            job.held = 0
            let_go_of_inputs(job)  # the history keeps results, not inputs
        job.touch()

    # ---- the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                job = self._waiting.popleft()
                batch = take_batch(self._waiting, job, self.config.max_batch, self.default_model)
                self.current, self.running = job, batch
                for j in batch:
                    j.state = "running"
                    j.started = time.time()
            for j in batch:
                j.touch()
            try:
                if len(batch) > 1:
                    run_batch(self, batch)
                    continue
                self._execute(job)
                state = "interrupted" if job.stop_flag else "done"
                if job.stop_flag and (job.cancel_flag or not job.images):
                    state = "cancelled"
                self.finish(job, state)
            except Exception as e:  # a bug or a broken model file: logged here, a short message to the client
                self.fail(job, e)
            finally:
                with self._cond:
                    for j in batch:
                        if not j.done:  # a bug in the batch runner: never leave a client waiting
                            self.finish(j, "failed", "the batch stopped unexpectedly", "internal")
                    self.current, self.running = None, []
                    self.last = job

    def fail(self, job: Job, error: Exception) -> None:
        """Finish a job with an error of ours (a bug, a broken model file): logged, a short message to the client.
        Errors about what the client sent (a prompt over the token limit, a LoRA or upscaler name that is not
        there) are the client's: a 400 with their message."""
        if isinstance(error, _CLIENT_ERRORS):
            self.finish(job, "failed", str(error), "request")
            return
        if isinstance(error, _FILE_ERRORS):
            log.error("job %s failed: %s", job.id, error)
            self.finish(job, "failed", public_message(f"{error}"), "file")
            return
        log.error("job %s failed", job.id, exc_info=error)
        self.finish(job, "failed", public_message(f"{type(error).__name__}: {error}"), "internal")

    def _execute(self, job: Job) -> None:
        spec = job.spec
        if spec.kind == "extras":  # the Extras tab's upscaling (server/extras.py): no model needed
            from latentforge.server import extras

            for image in spec.init_images or []:
                if job.stop_flag:
                    break
                job.images.append(extras.postprocess(image, spec.payload, self.config))
                job.touch()
            return
        if spec.kind == "unload":
            self.cache.clear()
            return
        name = spec.model or self.default_model
        if name is None:
            raise RequestError("no model is loaded: start the server with -m or --models-dir")
        job.model_name = name
        pipe = self.cache.get(name, spec.vae)
        job.vae_path = pipe.info.vae_source if pipe.info and pipe.info.vae_source != "checkpoint" else None
        job.inpainting_model = is_inpainting_model(pipe)
        if spec.kind == "load":
            self.default_model = name
            return
        req = spec.request
        if spec.refiner_model is not None:  # the refiner as a loaded pipeline: no client path reaches a loader
            if self.config.max_models < 2:
                raise RequestError("refiner_checkpoint: the refiner needs two loaded models; start with --max-models 2")
            refiner = self.cache.get(spec.refiner_model)
            pipe = self.cache.get(name, spec.vae)
            req = dataclasses.replace(req, refiner=dataclasses.replace(req.refiner, checkpoint=refiner))
        if spec.hires_model is not None:  # the same, for the hires pass's model
            other: object = ""  # the job's own model: the hires pass runs it
            if spec.hires_model != name:
                if self.config.max_models < 2:
                    raise RequestError(
                        "hr_checkpoint_name: another model for the hires pass needs two loaded models; "
                        "start with --max-models 2"
                    )
                other = self.cache.get(spec.hires_model, spec.vae)  # sd_vae applies to it too, as in A1111
                pipe = self.cache.get(name, spec.vae)
            req = dataclasses.replace(req, hires=dataclasses.replace(req.hires, checkpoint=other))
        seed, subseed, seeds, subseeds = pick_seeds(req, req.batch_size * req.batch_count)
        job.iterations = req.batch_count
        for it in range(req.batch_count):
            if job.stop_flag:
                break
            job.iteration, job.step, job.skip_flag = it, 0, False
            first = it * req.batch_size
            part = dataclasses.replace(req, seed=seeds[first], subseed=subseeds[first], batch_count=1)
            images = spec.init_images
            if images:  # the init images cycle over the whole run as generate() does
                shift = (it * req.batch_size) % len(images)
                images = images[shift:] + images[:shift]
            try:
                result = generate(
                    pipe,
                    part,
                    init_images=images,
                    progress=lambda p: self._progress(job, p),
                    upscaler_dirs=self.config.upscaler_dirs,
                    partial=True,  # interrupt and skip keep the image being made, as A1111
                )
            except Interrupted:  # stopped before its first step: nothing to keep
                if job.stop_flag:
                    break
                continue  # skipped
            if job.cancel_flag:
                break
            self.store(job, result)
            job.request = dataclasses.replace(result.request, seed=seed, subseed=subseed, batch_count=req.batch_count)
            job.touch()
            if job.stop_flag:
                break

    def store(self, job: Job, result: GenerationResult) -> None:
        """Add a run's images to a job (and write them to --outdir when the client asked)."""
        spec = job.spec
        if spec.save_to is not None:  # numbered names made here: always inside --outdir
            spec.save_to.mkdir(parents=True, exist_ok=True)
            for image, path in zip(result.images, next_free_names(spec.save_to, result.seeds)):
                save_png(image, spec.save_to / path.name)
        job.images.extend(result.images)
        job.seeds.extend(result.seeds)
        job.infotexts.extend(result.infotexts)
        job.request = result.request
        job.touch()

    def _progress(self, job: Job, p: Progress) -> None:
        if job.stop_flag or job.skip_flag:
            raise Interrupted()
        job.step, job.steps = p.step, p.steps
        now = time.monotonic()
        if now - job._last_preview >= job.spec.preview_every or p.step == p.steps:
            job._last_preview = now
            previews = p.preview()
            if previews:
                buf = io.BytesIO()
                previews[0].save(buf, format="PNG")
                job.preview_png = buf.getvalue()
        job.touch()
