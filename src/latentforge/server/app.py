"""The FastAPI application: A1111's ``/sdapi/v1`` routes, the jobs extension ``/latentforge/v1/jobs`` and
the web page at ``/`` (``static/``). Handlers never run torch: they submit jobs to ``jobs.JobQueue``.

Errors are JSON in A1111's shape ``{"error", "detail", "body", "errors"}`` (plus ``field`` when one field
is at fault): 400 for requests that cannot run, 401 for a wrong password, 404 for unknown jobs, 413 for
bodies over the limit, 422 for fields of the wrong type, 503 with ``Retry-After`` when the queue is full;
a 500 names no internals (the traceback goes to the server log).
"""

from __future__ import annotations

import base64
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentforge._version import __version__
from latentforge.io.hashing import sha256_of
from latentforge.pipelines.infotext_fields import SCHEDULE_TITLES
from latentforge.pipelines.request import IMAGE_UPSCALERS, LATENT_UPSCALERS, RequestError
from latentforge.sampling.registry import SAMPLERS
from latentforge.server import extras, sdapi, sdapi_meta
from latentforge.server.config import ServerConfig
from latentforge.server.errors import INTERNAL_MESSAGE, ApiError, Guard, error_response, validation_response
from latentforge.server.jobs import Job, JobQueue, JobSpec, QueueFull, make_spec
from latentforge.server.models import ModelCatalog

log = logging.getLogger("latentforge.server")
STATIC = resources.files("latentforge.server").joinpath("static")


def create_app(
    config: ServerConfig,
    *,
    users: list[tuple[str, str]] | None = None,
    cors_origins: list[str] | None = None,
    queue: JobQueue | None = None,
) -> FastAPI:
    """The application; its ``state.queue`` worker starts with the app and stops with it."""
    catalog = ModelCatalog(config.model, config.models_dir)
    queue = queue or JobQueue(config, catalog)
    outdir = Path(config.outdir).resolve()
    options: dict[str, Any] = {
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "outdir_samples": str(outdir),
        # A1111's default source, "GPU", is torch.randn on the device it runs on: on a CUDA server that is
        # our "GPU", on a CPU one the CPU's torch.randn, our "CPU" (our "GPU" there reproduces CUDA's noise)
        "randn_source": "GPU" if str(config.device or "cpu").startswith("cuda") else "CPU",
    }

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        # A1111's generation routes hold a worker thread while their job waits: room for a full queue
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, config.queue_size + 24)
        queue.start()
        if queue.default_model is not None:  # load the first model now, not on the first request
            queue.submit(JobSpec("load", model=queue.default_model))
        yield
        queue.close()

    app = FastAPI(title="latentforge", version=__version__, lifespan=lifespan)
    app.state.queue = queue
    app.add_middleware(Guard, users=users or [], max_body=config.max_body_bytes)
    if cors_origins:  # added last, so outermost: the Guard's own errors (401, 413, bad JSON) and 500s carry
        # the CORS headers too, and a browser client can read them
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.kind, e.message, e.field)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_response(400, type(e).__name__, str(e), getattr(e, "field", None))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull):
        return error_response(503, "QueueFull", str(e), headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        message = str(e.detail)
        if e.status_code == 404:
            message = f"no such endpoint {request.url.path!r}; the API is under /sdapi/v1 (see /docs)"
        elif e.status_code == 405:
            allowed = {k.lower(): v for k, v in (e.headers or {}).items()}.get("allow", "")
            message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        elif e.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON; send a JSON object in UTF-8"
        return error_response(e.status_code, kinds.get(e.status_code, "RequestError"), message, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # Starlette's last resort: Guard answers first
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "InternalError", INTERNAL_MESSAGE)

    # ---- generation
    def _generate(payload: sdapi._Payload, img2img: bool) -> dict:
        req, init, model, vae = sdapi.server_request(payload, img2img=img2img, options=options, config=config)
        kept = None  # A1111: override_settings_restore_afterwards false keeps every overridden setting
        if not payload.override_settings_restore_afterwards:  # (those of the infotext too), checked as POST options
            kept = dict(payload.override_settings or {})
            if "sd_vae" in kept:  # the VAE the request runs with (an infotext's unknown VAE fell back to "None")
                kept["sd_vae"] = vae
            kept = _option_values(kept)
        spec = make_spec(catalog, "img2img" if img2img else "txt2img", req, init, model, payload, vae)
        spec.save_to = outdir if payload.save_images else None
        job = queue.submit(spec, payload.force_task_id or None)
        job.wait()
        if kept is not None:  # set before the run and not restored, whatever its outcome (A1111's process_images)
            options.update(kept)
        _raise_failed(job)
        if spec.model and kept is not None:
            queue.default_model = spec.model
        return _response(job, payload)

    def _raise_failed(job: Job) -> None:
        if job.state == "failed":
            if job.error_kind == "request":
                raise ApiError(400, job.error or "the request cannot run")
            if job.error_kind == "file":  # a file on the server the request chose: which one, and why
                raise ApiError(500, job.error or "a file the request chose cannot be used", kind="FileError")
            what = "loading the model" if job.spec.kind == "load" else "generation"
            raise ApiError(500, f"{what} failed; the server log has the details", kind="InternalError")

    def _response(job: Job, payload: sdapi._Payload) -> dict:
        images = [sdapi.encode_png(im) for im in job.images] if payload.send_images else []
        return {
            "images": images,
            "parameters": sdapi.echo_parameters(payload),
            "info": sdapi.info_json(job, payload, model_hash=_hash(job.model_name), model_path=_path(job.model_name)),
        }

    def _path(name: str | None) -> Path | None:
        try:
            return catalog.path(name) if name else None
        except KeyError:  # gone from the catalog since (refresh-checkpoints)
            return None

    def _hash(name: str | None) -> str | None:
        if not name:
            return None
        path = catalog.path(name)
        return sha256_of(path)[:10] if path.is_file() else None

    @app.post("/sdapi/v1/txt2img")
    def txt2img(payload: sdapi.Txt2ImgPayload) -> dict:
        return _generate(payload, img2img=False)

    @app.post("/sdapi/v1/img2img")
    def img2img(payload: sdapi.Img2ImgPayload) -> dict:
        return _generate(payload, img2img=True)

    @app.post("/sdapi/v1/png-info")
    def png_info(payload: sdapi.PngInfoPayload) -> dict:
        if not payload.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        im = sdapi.decode_image(payload.image, "image", config.max_image_pixels)
        return sdapi_meta.png_info(im)

    def _extras(payload: extras.ExtrasOptions, images: list) -> list[str]:
        """Upscale on the worker, in queue order, as any job (the pixel budget counts its images)."""
        extras.check(payload, images, config)  # before queueing: a bad option is a 400 at once
        job = queue.submit(JobSpec("extras", init_images=images, payload=payload))
        job.wait()
        _raise_failed(job)
        return [sdapi.encode_png(im) for im in job.images]

    @app.post("/sdapi/v1/extra-single-image")
    def extra_single_image(payload: extras.ExtrasSingle) -> dict:
        image = sdapi.decode_image(payload.image, "image", config.max_image_pixels)
        out = _extras(payload, [image])
        return {"html_info": extras.html_info(payload, extras.scale_of(payload, image.size)), "image": out[0]}

    @app.post("/sdapi/v1/extra-batch-images")
    def extra_batch_images(payload: extras.ExtrasBatch) -> dict:
        budget = sdapi.PixelBudget(config.max_image_pixels)
        images = [
            sdapi.decode_image(f.data, f"imageList[{i}].data", config.max_image_pixels, budget)
            for i, f in enumerate(payload.imageList)
        ]
        out = _extras(payload, images)
        scale = extras.scale_of(payload, images[0].size) if images else payload.upscaling_resize
        return {"html_info": extras.html_info(payload, scale), "images": out}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict:
        job = queue.current or queue.last
        running = queue.current is not None
        if job is None or not running:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state(job, False),
                "current_image": None,
                "textinfo": None,
            }
        image = None if skip_current_image or not job.preview_png else base64.b64encode(job.preview_png).decode()
        return {
            "progress": round(job.fraction, 4),
            "eta_relative": round(job.eta(), 3),
            "state": _state(job, True),
            "current_image": image,
            "textinfo": f"step {job.step} of {job.steps}, pass {job.iteration + 1} of {job.iterations}",
        }

    def _state(job: Job | None, running: bool) -> dict:
        from datetime import datetime

        return {
            "skipped": bool(job and running and job.skip_flag),
            "interrupted": bool(job and job.stop_flag),
            "stopping_generation": bool(job and running and job.stop_flag),
            "job": f"{job.spec.kind} {job.id}" if job and running else "",
            "job_count": queue.pending(),
            "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S") if job else "0",
            "job_no": job.iteration if job and running else 0,
            "sampling_step": job.step if job and running else 0,
            "sampling_steps": job.steps if job and running else 0,
        }

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        queue.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict:
        queue.skip()
        return {}

    # ---- options and lists
    @app.get("/sdapi/v1/options")
    def get_options() -> dict:
        name = queue.default_model
        return {**options, "sd_model_checkpoint": name, "sd_checkpoint_hash": _full_hash(name)}

    def _full_hash(name: str | None) -> str | None:
        if not name:
            return None
        path = catalog.path(name)
        return sha256_of(path) if path.is_file() else None

    @app.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any]) -> dict:
        values = dict(values)
        name = values.pop("sd_model_checkpoint", None)
        values = _option_values(values)  # before the model switch: a refused request changes nothing
        if name:
            name = catalog.resolve(name)
            job = queue.submit(JobSpec("load", model=name))
            job.wait()
            _raise_failed(job)
        options.update(values)
        return {}

    def _option_values(values: dict[str, Any]) -> dict[str, Any]:
        """Options as the server keeps them, checked (a 400 for a value a request would fail on), without
        the model (``sd_model_checkpoint``: the default model) and what a client may not choose."""
        values.pop("sd_model_checkpoint", None)
        if "sd_vae" in values:
            values["sd_vae"] = sdapi.vae_choice(values["sd_vae"], "sd_vae", config.vaes())
        fmt = values.get("samples_format", "png")
        if not isinstance(fmt, str) or fmt.lower() != "png":
            raise ApiError(400, "samples_format: latentforge writes PNG only", "samples_format")
        clip = values.get("CLIP_stop_at_last_layers", 1)
        if not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12:
            raise ApiError(400, f"CLIP_stop_at_last_layers must be 1 to 12, got {clip!r}", "CLIP_stop_at_last_layers")
        for key in ("outdir_samples", "sd_checkpoint_hash"):
            values.pop(key, None)  # never a way for a client to choose where files go
        _check_option_values(values, options)
        sdapi.check_settings(values)
        return values

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict]:
        return [
            {"name": s.title, "aliases": [s.name, *s.aliases], "options": {"scheduler": s.schedule}} for s in SAMPLERS
        ]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict]:
        rows = [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
        ]
        for name, label in SCHEDULE_TITLES.items():
            rows.append({"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False})
        return rows

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict]:
        from latentforge.upscalers import available

        rows = [
            {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for n in IMAGE_UPSCALERS
        ]
        for name in available(config.upscaler_dirs):  # names only: paths stay on the server
            rows.append({"name": name, "model_name": "ESRGAN", "model_path": None, "model_url": None, "scale": 4.0})
        return rows

    @app.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models() -> list[dict]:  # the ESRGAN-family files of the upscaler folders, by name
        from latentforge.upscalers import available

        return [{"name": n, "path": None, "scale": None} for n in available(config.upscaler_dirs)]

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles() -> list[dict]:
        from latentforge.conditioning.styles import StylesFileError

        try:
            found = config.styles()
        except StylesFileError as e:  # the server's own file is damaged: say so, as a request would hear it
            log.warning("styles: %s", e)
            raise ApiError(500, sdapi.styles_error(e), kind="StylesFileError") from None
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in found.values()]

    @app.post("/sdapi/v1/interrogate")
    def interrogate() -> dict:  # A1111's CLIP/DeepDanbooru captioning: no such models here, said plainly
        raise ApiError(
            501,
            "image captioning (interrogate) is not available in latentforge: it needs the BLIP/CLIP interrogator "
            "or DeepDanbooru models; read a generated image's parameters with /sdapi/v1/png-info instead",
            kind="NotImplemented",
        )

    @app.get("/sdapi/v1/face-restorers")
    def face_restorers() -> list[dict]:
        return []  # none: restore_faces is refused

    @app.get("/sdapi/v1/sd-modules")
    def sd_modules() -> list[dict]:
        return []  # no separate text encoder modules (A1111's list for SD3 and Flux)

    @app.post("/sdapi/v1/unload-checkpoint")
    def unload_checkpoint() -> dict:  # A1111: frees the model's memory; the next job loads it again
        job = queue.submit(JobSpec("unload"))
        job.wait()
        _raise_failed(job)
        return {}

    @app.post("/sdapi/v1/reload-checkpoint")
    def reload_checkpoint() -> dict:
        if queue.default_model is not None:
            job = queue.submit(JobSpec("load", model=queue.default_model))
            job.wait()
            _raise_failed(job)
        return {}

    @app.get("/controlnet/version")
    def controlnet_version() -> dict:
        return {"version": 2}  # the A1111 ControlNet extension's API version whose unit fields are read

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict:
        from latentforge.io.hashing import legacy_model_hash

        return {"model_list": [f"{name} [{legacy_model_hash(path)}]" for name, path in config.controlnets().items()]}

    @app.get("/controlnet/module_list")
    def controlnet_modules() -> dict:
        from latentforge.pipelines.checks import CONTROL_MODULES

        return {"module_list": list(CONTROL_MODULES)}

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_modes() -> list[dict]:
        return [{"name": n} for n in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:
        rows = []
        for name in catalog.names():
            path = catalog.path(name)
            known = name in queue.cache.loaded and path.is_file()
            sha = sha256_of(path) if known else None
            rows.append(
                {
                    "title": name,
                    "model_name": Path(name).stem if path.is_file() else name,
                    "hash": sha[:10] if sha else None,
                    "sha256": sha,
                    "filename": str(path),
                    "config": None,
                }
            )
        return rows

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> dict:
        catalog.refresh()
        return {}

    for path in ("/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-embeddings"):
        app.post(path)(lambda: {})  # the folders are read afresh on every request

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict]:  # A1111's rows; the file name for a path (paths stay on the server)
        return [{"model_name": name, "filename": name} for name in config.vaes()]

    def _networks(kind: str) -> dict[str, Path]:
        from latentforge.adapters import folders as f

        found = config.network_folders()
        where = {"lora": found.lora, "embeddings": found.embeddings, "hypernetworks": found.hypernetworks}[kind]
        bundled = found.bundled_for(kind) if kind != "hypernetworks" else []
        if kind == "embeddings":  # tensor files by stem, A1111's embedding images by the name in their data
            return f.embedding_files([*where, *bundled])
        return f.files_by_stem(
            [*where, *bundled], {"lora": f.LORA_SUFFIXES, "hypernetworks": f.HYPERNETWORK_SUFFIXES}[kind]
        )

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict]:  # names only: paths stay on the server; the alias is ss_output_name, as A1111
        from latentforge.adapters.folders import lora_alias

        files = _networks("lora")
        return [{"name": n, "alias": lora_alias(p) or n, "path": None, "metadata": {}} for n, p in files.items()]

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks() -> list[dict]:
        return [{"name": n, "path": None} for n in _networks("hypernetworks")]

    read_embeddings: dict[Path, tuple[int, int, Any]] = {}  # file -> (mtime, size, Embedding or None): read once

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict:
        """A1111's listing: each embedding's step and checkpoint (when its file records them), "shape" (the
        vectors' width) and "vectors"; "skipped" those whose width does not fit the default model, when it is
        loaded (A1111 compares with the loaded model). Files that cannot be read are left out, as A1111 does."""
        from latentforge.conditioning.embeddings import EmbeddingError, read_embedding

        cache = getattr(queue, "cache", None)
        pipe = cache.loaded.get(queue.default_model) if cache is not None and queue.default_model else None
        slots = pipe.text.slots if pipe is not None else None
        out: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for name, path in _networks("embeddings").items():
            try:
                stat = path.stat()
                seen = read_embeddings.get(path)
                if seen is None or seen[:2] != (stat.st_mtime_ns, stat.st_size):
                    try:
                        emb = read_embedding(path, name)
                    except EmbeddingError as e:
                        log.warning("embedding %s: %s", name, e)
                        emb = None
                    seen = read_embeddings[path] = (stat.st_mtime_ns, stat.st_size, emb)
            except OSError:
                continue
            emb = seen[2]
            if emb is None:
                continue
            row = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, **emb.info}
            row.update(shape=emb.shape, vectors=emb.count)
            fits = slots is None or emb.for_encoders(slots) is not None
            out["loaded" if fits else "skipped"][name] = row
        return out

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list:
        return []

    @app.get("/sdapi/v1/memory")
    def memory() -> dict:
        return {"ram": _ram(), "cuda": {"error": "latentforge serve reports CPU memory only"}}

    from latentforge.server.routes_jobs import add_job_routes

    add_job_routes(app, queue, catalog, config, options, _response)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(STATIC.joinpath("index.html")), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        allowed = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in allowed:
            raise ApiError(404, f"no static file {name!r}", kind="NotFound")
        return FileResponse(str(STATIC.joinpath(name)), media_type=allowed[name])

    return app


MAX_OPTIONS = 512  # option names kept (A1111's settings are about 400)
MAX_OPTION_BYTES = 64 << 10  # one option's value as JSON
MAX_OPTION_NAME = 128  # characters of an option's name (A1111's are under 64)


def _check_option_values(values: dict, options: dict) -> None:
    """Options are kept for the server's life and sent back by GET /sdapi/v1/options: each name at most
    MAX_OPTION_NAME characters, each value plain JSON (no NaN or infinity) of at most MAX_OPTION_BYTES, both
    writable as UTF-8 (no unpaired surrogates), and the names at most MAX_OPTIONS."""
    import json

    for key, value in values.items():
        shown = key[:40] + "..." if len(key) > 40 else key
        if len(key) > MAX_OPTION_NAME or not _utf8(key):
            message = f"option name {shown!r} is not a setting name ({len(key)} characters; at most {MAX_OPTION_NAME})"
            raise ApiError(400, message, shown)
        try:
            text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError):
            raise ApiError(400, f"{key}: the value must be plain JSON without NaN or infinity", key) from None
        size = len(text)
        if not _utf8(text):
            raise ApiError(400, f"{key}: the value holds text that is not valid Unicode (a lone surrogate)", key)
        if size > MAX_OPTION_BYTES:
            message = f"{key}: the value is {size} bytes as JSON; options take at most {MAX_OPTION_BYTES}"
            raise ApiError(400, message, key)
    if len(set(options) | set(values)) > MAX_OPTIONS:
        raise ApiError(400, f"too many options: the server keeps at most {MAX_OPTIONS} option names")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ram() -> dict:
    data: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        data = {"total": info["MemTotal"], "free": info.get("MemAvailable", info["MemFree"])}
        data["used"] = data["total"] - data["free"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/proc/self/statm") as f:
            data["process_rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    return data


__all__ = ["create_app"]
