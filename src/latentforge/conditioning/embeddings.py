"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors referenced by name in prompts.

File formats read (all without running pickled code):

- A1111 ``.pt``: ``{"string_to_param": {"*": Tensor[n, width]}, "name": ..., ...}`` (``torch.load`` with
  ``weights_only=True``);
- ``.safetensors`` with one tensor (A1111 writes ``emb_params``);
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: Tensor[width] or [n, width]}``;
- SDXL pairs: ``clip_l`` [n, 768] for CLIP-L and ``clip_g`` [n, 1280] for OpenCLIP bigG;
- embeddings bundled in a LoRA file (``bundle_emb.<name>.*``, ``bundled_embedding``), in the same layouts;
- A1111's embedding images (``.png``/``.webp``: the JSON of a ``.pt``'s contents in a text chunk or in the
  pixels, ``io.embedding_image``), named by the ``name`` in their data as A1111 names them.

As in A1111, an embedding is referenced by its file stem (case-insensitive, as a whole word) in the
prompt and the negative prompt; its n vectors take n token positions, stay together in one 75-token
chunk and take the emphasis weight of the text around them. An embedding whose width does not fit the
model's text encoders is skipped with a warning and its name stays ordinary text: as in A1111, whose
embedding width (clip_l + clip_g for a pair) must equal the model's, an SDXL pair does not fit an SD1
model (nor the SDXL refiner), though its clip_l part has CLIP-L's width.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from latentforge.adapters.folders import embedding_files
from latentforge.io.components import require_finite
from latentforge.io.embedding_image import IMAGE_SUFFIXES, EmbeddingImageError, read_embedding_image
from latentforge.io.tensorfile import CheckpointError, load_pickle, open_tensor_file, short

# our encoder names (TextEncoderSpec.name) -> the key of SDXL embedding pairs
_PAIR_KEYS = {"clip-l": "clip_l", "openclip-g": "clip_g"}


class EmbeddingError(ValueError):
    """An embedding file cannot be read; the message names the file."""


@dataclass
class Embedding:
    name: str
    path: Path | None
    vectors: dict[str, Tensor]  # "*" for a one-encoder embedding, else "clip_l"/"clip_g"
    hash: str | None = None  # the infotext's TI hash when not the file's (bundled: the LoRA's name, as A1111)
    # what an A1111 file says of its training (step, sd_checkpoint, sd_checkpoint_name), for listings
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> int:
        """A1111's embedding "shape": the vectors' width (of an SDXL pair, both widths added)."""
        return sum(v.shape[1] for v in self.vectors.values())

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def for_encoders(self, slots: list[tuple[str, int]]) -> list[Tensor] | None:
        """The vectors for each text encoder, given as (name, width) (``TextConditioner.slots``), or None
        when they do not fit."""
        if "*" in self.vectors:
            if len(slots) != 1:
                return None
            rows = [self.vectors["*"]]
        else:
            keys = [_PAIR_KEYS.get(name) for name, _ in slots]
            if any(k not in self.vectors for k in keys) or set(self.vectors) - set(keys):
                return None  # every part is for one of the model's encoders (A1111: the widths add up)
            rows = [self.vectors[k] for k in keys]
        if any(r.shape[1] != width for r, (_, width) in zip(rows, slots)):
            return None
        return rows


def _as_rows(t: Tensor, path: Path, key: str) -> Tensor:
    """[width] or [..., n, width] vectors as [n, width] float32; an EmbeddingError naming the file and the
    tensor for one that holds no vectors, is not floating point, or holds NaN/Inf."""
    if t.dim() == 0 or t.numel() == 0:
        raise EmbeddingError(
            f"{path}: tensor {short(key)} has shape {list(t.shape)}; an embedding holds vectors, [n, width]"
        )
    if not t.is_floating_point():
        raise EmbeddingError(
            f"{path}: tensor {short(key)} is stored as {str(t.dtype).removeprefix('torch.')}; an embedding's "
            "vectors are floating point, so the file is damaged or not an embedding"
        )
    t = require_finite(t.detach().float(), f"{path}: tensor {short(key)}", EmbeddingError)
    return t[None] if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read a textual-inversion file in any of the formats of this module."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _from_image(path, name)
    name = name or path.stem
    if path.suffix.lower() == ".safetensors":
        try:
            f = open_tensor_file(path)
        except CheckpointError as e:
            raise EmbeddingError(str(e)) from None
        try:
            data = {k: f.read(k) for k in f.keys()}
        finally:
            f.close()
    else:
        try:
            data = load_pickle(path)  # weights_only, after the checks every pickle gets
        except CheckpointError as e:
            raise EmbeddingError(f"{e} (reading it as a textual-inversion embedding)") from None
    return _from_data(data, name, path)


def _from_image(path: Path, name: str | None) -> Embedding:
    try:
        data = read_embedding_image(path)
    except EmbeddingImageError as e:
        raise EmbeddingError(str(e)) from None
    if data is None:
        raise EmbeddingError(
            f"{path} holds no textual-inversion embedding: neither an sd-ti-embedding text chunk nor data in "
            "its pixels (an A1111 preview card or another picture, not an embedding image)"
        )

    def tensors(value):
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        return {k: tensors(v) for k, v in value.items()} if isinstance(value, dict) else value

    given = data.get("name")
    name = name or (given if isinstance(given, str) and given.strip() else path.stem)
    return _from_data(tensors(data), name, path)


def _training_info(data) -> dict:
    """The step and checkpoint an A1111 embedding file records (plain values only)."""
    if not isinstance(data, dict):
        return {}
    step = data.get("step")
    out = {"step": step if isinstance(step, int) and not isinstance(step, bool) else None}
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        value = data.get(key)
        out[key] = value[:256] if isinstance(value, str) else None
    return out


def _from_data(data, name: str, path: Path, hash: str | None = None) -> Embedding:
    embedding = _from_parts(data, name, path, hash)
    embedding.info = _training_info(data)
    return embedding


def _from_parts(data, name: str, path: Path, hash: str | None = None) -> Embedding:
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = [(k, v) for k, v in data["string_to_param"].items() if isinstance(v, Tensor)]
        if params:
            rows = _as_rows(params[0][1], path, f"string_to_param.{params[0][0]}")
            return Embedding(name, path, {"*": rows}, hash)
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, dict) else {}
    if "clip_l" in tensors or "clip_g" in tensors:
        pair = {k: _as_rows(tensors[k], path, k) for k in ("clip_l", "clip_g") if k in tensors}
        return Embedding(name, path, pair, hash)
    if len(tensors) == 1:
        key, tensor = next(iter(tensors.items()))
        return Embedding(name, path, {"*": _as_rows(tensor, path, str(key))}, hash)
    keys = ", ".join(short(k, 40) for k in list(data)[:5]) if isinstance(data, dict) else type(data).__name__
    raise EmbeddingError(
        f"{path} is not a textual-inversion embedding: expected string_to_param, one tensor, or clip_l/clip_g; "
        f"found {keys}"
    )


def bundled_embedding(name: str, tensors: dict[str, Tensor], lora: Path, lora_name: str) -> Embedding:
    """An embedding bundled in LoRA file ``lora`` (its tensors ``bundle_emb.<name>.<vector name>``, given here
    by vector name: ``string_to_param.<token>``, ``clip_l``/``clip_g`` or one tensor), as A1111's
    ``networks.load_network`` reads it; its TI hash in the infotext is the LoRA's name (A1111's
    ``BundledTIHash``)."""
    params = {k.removeprefix("string_to_param."): v for k, v in tensors.items() if k.startswith("string_to_param.")}
    data = {"string_to_param": params} if params else dict(tensors)
    return _from_data(data, name, lora, hash=lora_name)


@dataclass
class EmbeddingSet:
    """The embeddings a ``TextConditioner`` knows: those added by hand and those in the folders that
    ``folders()`` gives (read when a prompt first names them; a file changed on disk is read again).
    ``fallback()`` gives folders of bundled embeddings (the demo's): a name there counts only when no user
    file has it, and only when the embedding fits the model; one that does not fit is skipped silently,
    so a word such as "scarlet" stays plain text for any other model."""

    folders: Callable[[], list[Path]] = list
    added: dict[str, Embedding] = field(default_factory=dict)
    fallback: Callable[[], list[Path]] = list
    _cache: dict[Path, tuple[int, Embedding]] = field(default_factory=dict, repr=False)

    def add(self, embedding: Embedding | str | Path) -> Embedding:
        if not isinstance(embedding, Embedding):
            embedding = read_embedding(embedding)
        self.added[embedding.name] = embedding
        return embedding

    def _files(self) -> dict[str, Path]:
        folders = self.folders()
        return embedding_files(folders) if folders else {}

    def _bundled(self) -> dict[str, Path]:
        """Files of the fallback folders whose names no user file (nor added embedding) has."""
        folders = self.fallback()
        if not folders:
            return {}
        taken = {n.lower() for n in [*self._files(), *self.added]}
        return {n: p for n, p in embedding_files(folders).items() if n.lower() not in taken}

    def names(self) -> dict[str, str]:
        """Lower-cased name -> name of every known embedding."""
        out = {n.lower(): n for n in self._bundled()}
        out.update({n.lower(): n for n in self._files()})
        out.update({n.lower(): n for n in self.added})
        return out

    def get(self, name: str) -> Embedding:
        if name in self.added:
            return self.added[name]
        path = self._files().get(name) or self._bundled()[name]
        mtime = path.stat().st_mtime_ns
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_embedding(path, name))
            self._cache[path] = cached
        return cached[1]

    def find(self, text: str, slots: list[tuple[str, int]]) -> list[Embedding]:
        """The embeddings named in ``text`` that fit the encoders ``slots`` (name, width), in order of first
        mention (warning for each named one that does not fit)."""
        names = self.names()
        if not names or not text:
            return []
        bundled = {p.resolve() for p in self._bundled().values()}
        pattern = _name_pattern(names)
        found: dict[str, Embedding] = {}
        for m in pattern.finditer(text.lower()):
            name = names[m.group(1)]
            if name in found:
                continue
            emb = self.get(name)
            if emb.for_encoders(slots) is None and emb.path is not None and emb.path.resolve() in bundled:
                continue  # a bundled embedding for another model: the word stays plain text
            if emb.for_encoders(slots) is None:
                widths = {k: v.shape[1] for k, v in emb.vectors.items()}
                warnings.warn(
                    f"embedding {name} ({emb.path}) has vectors {widths}, which do not fit this model's text "
                    f"encoders ({', '.join(f'{n} {w}' for n, w in slots)}); it is skipped",
                    stacklevel=2,
                )
                continue
            found[name] = emb
        return list(found.values())


def split_on_embeddings(text: str, embeddings: list[Embedding]) -> list[str | Embedding]:
    """``text`` cut into plain pieces and the embeddings it names (whole words, case-insensitive)."""
    if not embeddings:
        return [text]
    by_name = {e.name.lower(): e for e in embeddings}
    pattern = _name_pattern(by_name, re.I)
    out: list[str | Embedding] = []
    last = 0
    for m in pattern.finditer(text):
        out.append(text[last : m.start()])
        out.append(by_name[m.group(1).lower()])
        last = m.end()
    out.append(text[last:])
    return out


def _name_pattern(names, flags: int = 0) -> re.Pattern:
    """Any of ``names`` as a whole word (longest first, so "cat2" wins over "cat")."""
    alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    return re.compile(r"(?<![\w])(" + alternatives + r")(?![\w])", flags)
