"""Writing outputs atomically: a temporary file beside the target, fsync, then rename.

Nothing that exists is replaced unless the caller passes ``overwrite=True`` (names are taken
exclusively, so not even a file another process created a moment ago); a failure leaves no partial
file behind. Files and folders get the usual mode (0666/0777 minus the umask).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from latentforge.io.tensorfile import SAFETENSORS_DTYPES

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class OutputError(ValueError):
    """An output location that cannot be written; the message names it and what to choose instead."""


def _stem(path: Path) -> str:
    """``path``'s name cut to at most 200 bytes as the file system counts them (names are limited to 255
    bytes, not characters: 80 CJK characters are 240 bytes), for the temporary names made beside it."""
    raw = os.fsencode(path.name)[:200]
    return os.fsdecode(raw.decode("utf-8", "ignore").encode("utf-8")) if len(raw) == 200 else path.name


NAME_MAX = 255  # bytes of one file name on Linux, macOS and Windows file systems


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Before any work: a name the file system cannot take, or (unless ``overwrite``) a name that is
    taken, also by a dangling symbolic link, is an error."""
    size = len(os.fsencode(path.name))
    if size > NAME_MAX:
        raise OutputError(f"{path.name[:40]}...: the file name is {size} bytes, more than file systems take "
                          f"({NAME_MAX}); choose a shorter name")  # fmt: skip
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another name or pass overwrite (--overwrite) to replace it"
        )


def _make_folder(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the output folder {folder}: {e.strerror or e}; choose another {option}"
        ) from None


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with a random name, created exclusively with mode 0666 minus the umask (as any
    normal file; ``tempfile.mkstemp`` would give 0600, and the rename keeps the mode)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary file in {folder}: every random name was taken")


def check_writable_folder(folder: str | Path, option: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it writable by creating and removing a file there, so an
    unusable output location is found before minutes of work. ``option`` names what to change."""
    folder = Path(folder)
    _make_folder(folder, option)
    if not folder.is_dir():
        raise OutputError(f"the output folder {folder} is not a folder; choose another {option}")
    try:
        _new_file(folder, ".latentforge-write-check.", ".tmp").unlink()
    except OSError as e:
        raise OutputError(
            f"cannot write in the output folder {folder}: {e.strerror or e}; choose another {option}"
        ) from None
    return folder


def publish(tmp: Path, path: Path, *, overwrite: bool = False) -> None:
    """Give the finished file ``tmp`` its name ``path`` atomically. Without ``overwrite`` an existing
    ``path`` is never replaced, even one created a moment ago by another process: the name is taken with
    a hard link (fails if it exists), or where links are unsupported by an exclusive create first."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (it appeared while writing); not replacing it") from None
    except OSError:  # no hard links here (FAT, some network shares): claim the name, then fill it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise FileExistsError(f"{path} already exists (it appeared while writing); not replacing it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is published as ``path``."""
    path = Path(path)
    refuse_existing(path, overwrite)
    if path.is_dir():  # (overwrite: a file never replaces a folder, found before the work, not after it)
        raise OutputError(f"{path} is a folder; give a file name for the output")
    _make_folder(path.parent, "output location")
    tmp = _new_file(path.parent, f".{_stem(path)}.", ".partial")
    try:
        yield tmp
        _fsync(tmp)
        publish(tmp, path, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` among processes that take it (flock on the folder itself, so no
    lock file is left behind); a no-op where the OS has no flock (then names are still never reused
    for the same file, but two numbers can coincide)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_numbered(folder: str | Path, write: Callable[[Path], None], next_name: Callable[[], str]) -> Path:
    """Write a file with ``write(tmp)`` and publish it under ``next_name()`` (which looks at the folder
    each time it is called, e.g. for the next free number). Scanning and publishing happen under the
    folder's lock and the name is taken exclusively, retrying with a fresh name when it is taken, so
    concurrent processes never overwrite each other's files."""
    folder = Path(folder)
    _make_folder(folder, "output folder")
    tmp = _new_file(folder, ".latentforge-", ".partial")
    try:
        write(tmp)
        _fsync(tmp)
        with _folder_lock(folder):
            for _ in range(1000):
                path = folder / next_name()
                try:
                    publish(tmp, path)
                    return path
                except FileExistsError:
                    continue
        raise OutputError(f"cannot find a free name in {folder}: every name tried was taken")
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, *, overwrite: bool = False, replaceable: Callable[[Path], str | None] | None = None
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it takes ``path``'s place. Without
    ``overwrite`` an existing ``path`` is refused, also one that appeared while the folder was written.

    With ``overwrite`` the old ``path`` is first moved into a fresh folder made for it
    (``.NAME.old.XXXXXXXXXXXX``, made exclusively, so no name of the user's is ever reused or removed),
    then the new folder is renamed to ``path`` (each step one rename), and only then is the old copy
    deleted. Should the second rename fail, the old copy is put back; should that fail too, the error says
    where it is. Only what this function made is ever deleted. ``replaceable(path)``: None when an existing
    ``path`` may be replaced, else why not (checked before any work: a folder of the user's that is not
    what this writes is never replaced)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    if replaceable is not None and os.path.lexists(path):
        why = replaceable(path)
        if why is not None:
            raise OutputError(f"{path} {why}; --overwrite replaces it only then: choose another name, or move it away")
    _make_folder(path.parent, "output location")
    tmp = _new_folder(path.parent, f".{_stem(path)}.", ".partial")
    try:
        yield tmp
        if _rename_noreplace(tmp, path):
            return
        if not overwrite:
            raise FileExistsError(f"{path} already exists (it appeared while writing); not replacing it")
        holder = _new_folder(path.parent, f".{_stem(path)}.old.", "")
        old = holder / "old"
        try:
            os.replace(path, old)
        except OSError:
            holder.rmdir()
            raise
        try:
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.replace(old, path)
            except OSError:
                raise OutputError(
                    f"cannot replace {path} ({e.strerror or e}), and its previous content could not be moved "
                    f"back: it is in {old}"
                ) from e
            holder.rmdir()
            raise
        shutil.rmtree(holder, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (2.28 and later, on Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename the folder ``src`` to ``dst`` unless ``dst`` exists; False (nothing moved) if it does. One
    system call where the kernel and file system know ``RENAME_NOREPLACE``: a plain rename would replace an
    empty folder made at ``dst`` after the last check. Elsewhere, a check and then a rename (which never
    replaces a file or a folder that is not empty)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not a missing feature: a real failure
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            return False
        raise
    return True


def _new_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder with a random name, made exclusively with mode 0777 minus the umask (as any normal
    folder; ``tempfile.mkdtemp`` would give 0700, and the rename keeps the mode)."""
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary folder in {parent}: every random name was taken")


def _raw_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a ``.safetensors`` file tensor by tensor (no second copy of the weights in memory)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    try:  # UTF-8 as the safetensors library writes it (not \u escapes)
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"a tensor name or metadata text holds {e.object[e.start : e.end]!r}, which is not valid Unicode "
            "(a lone surrogate); safetensors headers are UTF-8: rename it"
        ) from None
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(_raw_bytes(t))
    return path


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
