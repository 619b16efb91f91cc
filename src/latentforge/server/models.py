"""The selectable models and the cache of loaded ones (used by the worker thread of ``jobs.py`` only).

A model name from a client resolves only to an entry of the catalog (the startup model and the files
under ``--models-dir``); nothing a client sends is used as a path. The cache keeps at most
``max_models`` pipelines (and ``max_model_bytes`` of weights); switching evicts the least recently used
one and collects it, so its memory is returned.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from latentforge import allocator
from latentforge.nn import packed
from latentforge.pipelines.request import RequestError
from latentforge.server.config import VAE_BESIDE, ServerConfig

log = logging.getLogger("latentforge.server")
MODEL_SUFFIXES = (".safetensors", ".ckpt")


class ModelNameError(RequestError):
    """A model name that is not one of the listed models (or tries to leave the models folder)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ModelCatalog:
    """The selectable models: the startup model plus every checkpoint (``*.safetensors``, ``*.ckpt``,
    diffusers folders with ``model_index.json``) under ``models_dir``. A name resolves only to a listed
    entry (by title, file name, stem or relative path); nothing a client sends is used as a path."""

    def __init__(self, default: Path | None, models_dir: Path | None):
        self.default_path = Path(default).resolve() if default else None
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self._entries: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, Path] = {}
        if self.default_path is not None:
            found[_name_of(self.default_path, self.default_path.parent)] = self.default_path
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in sorted(self.models_dir.rglob("*")):
                is_vae = p.name.lower().endswith(VAE_BESIDE)  # A1111 lists these as VAEs, not models
                is_model = (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES and not is_vae) or (
                    p.is_dir() and (p / "model_index.json").is_file()
                )
                if is_model and self._inside(p):
                    found.setdefault(_name_of(p, self.models_dir), p.resolve())
        self._entries = found

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.models_dir)
        except ValueError:
            return False
        return True

    def names(self) -> list[str]:
        return list(self._entries)

    def path(self, name: str) -> Path:
        return self._entries[name]

    def default_name(self) -> str | None:
        return next(iter(self._entries), None)

    def resolve(self, name: str, where: str = "sd_model_checkpoint") -> str:
        """The listed name that ``name`` means: a title ("name.safetensors [hash]"), a file name, a stem or
        a path relative to the models folder. Absolute paths and '..' are refused outright."""
        if not isinstance(name, str) or not name.strip():
            raise ModelNameError(f"{where} must be a model name from /sdapi/v1/sd-models, got {name!r}", where)
        text = name.strip()
        if " [" in text and text.endswith("]"):  # A1111's title carries the short hash
            text = text[: text.rindex(" [")]
        parts = Path(text.replace("\\", "/")).parts
        if Path(text).is_absolute() or text.startswith(("/", "\\")) or ".." in parts or ":" in text:
            raise ModelNameError(
                f"{where}: {name!r} is a path; give a model name as listed by /sdapi/v1/sd-models "
                "(models are only read from --models-dir)",
                where,
            )
        for key, path in self._entries.items():
            candidates = {key, Path(key).name, Path(key).stem, path.name, path.stem}
            if text in candidates:
                if self.models_dir is not None and path != self.default_path and not self._inside(path):
                    break
                return key
        raise ModelNameError(
            f"{where}: unknown model {name!r}; available: {', '.join(self._entries) or 'none'} "
            "(POST /sdapi/v1/refresh-checkpoints after adding files to --models-dir)",
            where,
        )


def _name_of(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


class ModelCache:
    """Loaded pipelines by catalog name, least recently used first out; bounded by count and bytes. Only
    the worker thread uses it."""

    def __init__(self, catalog: ModelCatalog, config: ServerConfig):
        self.catalog = catalog
        self.config = config
        self.loaded: OrderedDict[str, Any] = OrderedDict()

    def get(self, name: str, vae: str | None = None):
        """The loaded pipeline of catalog entry ``name``; with ``vae`` ("Automatic", "None" or a file name
        of the VAE folders, as ``sdapi_settings.vae_choice`` gives) its VAE set to that one first."""
        pipe = self._get(name)
        if vae is not None:
            path = self.vae_path(name, vae)
            try:
                pipe.set_vae(path)
            except (ValueError, OSError) as e:  # a VAE that does not fit this model, or a damaged file
                log.warning("sd_vae %s for %s: %s", vae, name, e)
                reason = str(e).replace(str(path), Path(path).name) if path is not None else str(e)
                raise RequestError(f"sd_vae: {vae} cannot be used with {name}: {reason}") from None
        return pipe

    def vae_path(self, name: str, vae: str) -> Path | None:
        """The VAE file ``vae`` means for model ``name`` (None: the checkpoint's own). "Automatic" is A1111's
        rule: the first VAE of ``ServerConfig.vaes`` (the VAE folders and ``*.vae.*`` beside checkpoints, by
        name) whose file name starts with the checkpoint's (``model.vae.safetensors``), else its own."""
        if vae == "None":
            return None
        if vae == "Automatic":  # A1111's find_vae_near_checkpoint: the first listed VAE named like the model
            stem = Path(self.catalog.path(name)).name.rsplit(".", 1)[0]
            return next((p for n, p in self.config.vaes().items() if n.startswith(stem)), None)
        found = self.config.vaes().get(vae)
        if found is None:
            raise RequestError(f"sd_vae: the VAE {vae!r} is no longer in the VAE folders; see /sdapi/v1/sd-vae")
        return found

    def _get(self, name: str):
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        import latentforge

        while len(self.loaded) >= max(1, self.config.max_models):
            self._evict()
        pipe = latentforge.load(self.catalog.path(name), dtype=self.config.dtype, device=self.config.device)
        pipe.folders = self.config.network_folders()
        if self.config.compile:
            pipe.compile()
        self.loaded[name] = pipe
        limit = self.config.max_model_bytes
        while limit and len(self.loaded) > 1 and self.total_bytes() > limit:
            self._evict()
        return pipe

    def _evict(self) -> None:
        name, pipe = self.loaded.popitem(last=False)
        log.info("unloading model %s", name)
        del pipe
        gc.collect()
        allocator.release()  # the model's memory back to the system (the heap keeps freed blocks otherwise)

    def total_bytes(self) -> int:
        return sum(_pipe_bytes(p) for p in self.loaded.values())

    def clear(self) -> None:
        while self.loaded:
            self._evict()


def _pipe_bytes(pipe) -> int:
    nets = [*pipe.networks().values(), *([pipe._own_vae] if getattr(pipe, "_own_vae", None) is not None else [])]
    return sum(packed.numel(net, nbytes=True) for net in nets)  # packed weights too; a VAE kept aside too
