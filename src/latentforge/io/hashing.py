"""A1111's model hash: the first 10 hex digits of the file's SHA-256, cached by path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("latentforge")


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "latentforge" / "hashes.json"


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, remembered in ~/.cache/latentforge/hashes.json (keyed by path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # a damaged cache is rebuilt, never a reason to fail
        cache = {}
    cached = cache.get(key)
    if isinstance(cached, str) and len(cached) == 64 and all(c in "0123456789abcdef" for c in cached):
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache[key] = value
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError as e:  # a read-only home is no reason to fail a generation
        log.debug("could not write the hash cache: %s", e)
    return value


def model_hash(path: str | Path) -> str | None:
    """A1111's 10-digit model hash of a single file, None for folders."""
    path = Path(path)
    return sha256_of(path)[:10] if path.is_file() else None


def addnet_hash(path: str | Path) -> str:
    """The "addnet" hash A1111 shows for LoRA ``.safetensors`` files: SHA-256 of the tensor data only (the
    bytes after the 8-byte length and the JSON header), so editing the metadata keeps the hash. For other
    files, the SHA-256 of the whole file. A1111 writes its first 12 hex digits as "Lora hashes"."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256_of(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-digit model hash (the one the ControlNet extension shows as "name [hash]"): the
    SHA-256 of the 64 KiB at offset 1 MiB of the file (of what is there, for shorter files)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
