"""The files of a model folder, read as untrusted input: each must resolve inside the folder.

Every file a diffusers folder names (configs, weights, shards listed in a ``*.index.json`` weight_map,
tokenizer files) must resolve, symlinks followed, to a regular file inside the folder; an entry with
``..``, an absolute path or a drive, or a link leaving the folder, is refused by name. The one exception
is the Hugging Face hub cache, where ``models--org--name/snapshots/<rev>/...`` files are links to the same
repository's ``blobs/``; links into that directory are followed. JSON files are read up to
``MAX_JSON_BYTES`` and must hold an object.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import Tensor

from latentforge.io.tensorfile import CheckpointError, TensorFile, open_tensor_file, regular_file, short

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
MAX_SHARDS = 1024  # files one shard index may name (each is opened and mapped)
MAX_JSON_BYTES = 64 * 2**20  # configs and shard indices are kilobytes; tokenizer vocabularies about 2 MB


def inside(root: Path, entry: str | Path, what: str, base: str = ".") -> Path:
    """``root / base / entry``, resolved; a CheckpointError naming ``what`` and ``entry`` unless it stays
    inside ``root`` (``..`` and absolute paths are refused as written, symlinks by where they lead)."""
    text = str(entry)
    if (
        not text
        or PurePosixPath(text).is_absolute()
        or PureWindowsPath(text).is_absolute()
        or PureWindowsPath(text).drive
        or ".." in PurePosixPath(text.replace("\\", "/")).parts
    ):
        raise CheckpointError(
            f"{what} names {short(text)}, which is not a path inside the folder {root}; a model folder may only "
            "refer to its own files"
        )
    root = root.resolve()
    target = (root / base / text).resolve()
    if target.is_relative_to(root) or _hub_blob(root, target):
        return target
    raise CheckpointError(
        f"{what} {short(text)} leads outside the folder {root} (to {short(str(target), 120)}, through a "
        "symbolic link); a model folder may only refer to its own files"
    )


def _hub_blob(root: Path, target: Path) -> bool:
    """A Hugging Face hub cache link: ``models--x/snapshots/<rev>/...`` -> ``models--x/blobs/<hash>``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return target.parent == folder.parent.parent / "blobs"
    return False


class ShardedFile:
    """Several weight files presented as one (a diffusers ``*.index.json`` shard set)."""

    def __init__(self, files: list[TensorFile]):
        self.files = files
        self._where: dict[str, TensorFile] = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    path = getattr(f, "path", "?")
                    raise CheckpointError(
                        f"tensor {short(k)} is in two shards ({self._where[k].path} and {path}); "  # type: ignore[union-attr]
                        "the shard set is damaged"
                    )
                self._where[k] = f
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        return self._where[key].read(key, dtype)

    def close(self) -> None:
        for f in self.files:
            f.close()


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is reported, not skipped


def open_component_weights(root: Path, sub: str = ".") -> TensorFile:
    """The weights of the component folder ``root/sub``: plain, sharded or fp16-variant, safetensors
    before pickles. Every file, shards included, must resolve inside ``root``."""
    for ext in (".safetensors", ".bin"):
        for variant in ("", ".fp16"):
            for stem in _WEIGHT_NAMES:
                single = f"{sub}/{stem}{variant}{ext}"
                if exists(root / single):
                    return open_tensor_file(inside(root, single, "weights file"), suffix=ext)
                index = f"{sub}/{stem}{variant}{ext}.index.json"
                if exists(root / index):
                    weight_map = read_json(root, index).get("weight_map")
                    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                        raise CheckpointError(
                            f"{root / index}: 'weight_map' must map tensor names to shard file names; re-download it"
                        )
                    what = f"{root / index} weight_map entry"
                    names = sorted(set(weight_map.values()))
                    if len(names) > MAX_SHARDS:
                        raise CheckpointError(
                            f"{root / index} lists {len(names)} shard files, more than latentforge's limit of "
                            f"{MAX_SHARDS} (MAX_SHARDS; real models have a few)"
                        )
                    shards = [(inside(root, s, what, base=sub), Path(s).suffix) for s in names]
                    return ShardedFile([open_tensor_file(path, suffix) for path, suffix in shards])
    raise CheckpointError(
        f"{root / sub} has no weights file (diffusion_pytorch_model.safetensors, model.safetensors, ...)"
    )


def read_json(root: Path, entry: str) -> dict:
    """The JSON object in ``root/entry``, which must resolve inside ``root`` and be at most MAX_JSON_BYTES."""
    path = root / entry
    if not exists(path):
        raise CheckpointError(f"{path} is missing; is {root} a complete diffusers folder?")
    size = regular_file(real := inside(root, entry, "file"))
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {size} bytes long, more than the {MAX_JSON_BYTES} a model's JSON file may be")
    try:
        data = json.loads(real.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({short(str(e), 160)}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download it")
    return data
