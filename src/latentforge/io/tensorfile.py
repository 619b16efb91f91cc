"""Reading tensors from checkpoint files one at a time, safely.

``.safetensors`` (format: https://github.com/huggingface/safetensors, "Format" section: 8-byte
little-endian header length, a UTF-8 JSON object ``{name: {dtype, shape, data_offsets}, "__metadata__":
{str: str}}``, then the data section) is validated completely before any tensor is read: the header is
parsed as the format describes and every entry checked (known dtype, non-negative integer shape, offsets
inside the data section whose length matches the shape, no duplicate names); sorted by offset, the
tensors must cover the data section exactly, without overlaps or gaps, as the reference library also
requires (``io/safetensors_header.py``, linear in the header's size). Tensors are memory-mapped; each
is copied out of the mapping and the mapped pages are released at once, so resident memory grows by the
loaded weights only.

``.ckpt``/``.pt``/``.bin`` pickles are opened only with ``torch.load(weights_only=True)``; a few
training-framework objects that old SD1 files carry next to the weights (and that hold no weights) are
replaced by inert stand-ins; anything else that needs unsafe unpickling is refused with an explanation.
Zip checkpoints are checked first: every member must be stored uncompressed (as ``torch.save`` writes
them) and lie inside the file, so a small file cannot claim or inflate to gigabytes. Legacy (pre-zip)
pickles are parsed first by an unpickler that builds nothing, so the storage sizes they declare (which
torch.load allocates before reading) must fit in the file, and a pickle not written by ``torch.save`` is
refused before torch.load sees it. Every pickle, of either kind, is at most ``MAX_PICKLE_BYTES``. Every
pickle reader (checkpoints, LoRAs, embeddings, hypernetworks, upscalers) goes through ``load_pickle``.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import re
import stat
import struct
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from latentforge.io.safetensors_header import MAX_HEADER_BYTES, CheckpointError, parse_safetensors_header, short
from latentforge.io.safetensors_header import SAFETENSORS_DTYPES as SAFETENSORS_DTYPES  # re-exported (writer)

_PAGE = mmap.PAGESIZE


def regular_file(path: Path) -> int:
    """The size of ``path``; a CheckpointError unless it is an existing regular file (not a folder or a
    pipe, which could block a reader forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(
            f"{path} is a folder, not a weights file; pass a .safetensors/.ckpt file or a diffusers folder"
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); pass a weights file")
    return st.st_size


class SafetensorsFile:
    """A ``.safetensors`` file: header parsed eagerly (and validated), tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = regular_file(self.path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open while the mapping lives
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from e
        try:
            self._open(size)
        except BaseException:
            self._file.close()
            raise

    def _open(self, size: int) -> None:
        head = self._file.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{self.path} is not a safetensors file: it is {size} bytes long (truncated or empty)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file (header length {n} > file size {size}); it may be "
                "truncated or not a safetensors file at all"
            )
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file: its header length {n} exceeds latentforge's limit of "
                f"{MAX_HEADER_BYTES} bytes; the file is damaged or not a safetensors file"
            )
        self.metadata, self._entries = parse_safetensors_header(self._file.read(n), size - 8 - n, self.path)
        self._base = 8 + n
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """A new tensor with its own memory, converted to ``dtype`` if given."""
        ftype, shape, begin, end = self._entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype or ftype)
        start = self._base + begin
        view = torch.frombuffer(self._map, dtype=ftype, count=(end - begin) // ftype.itemsize, offset=start)
        out = view.reshape(shape).to(dtype or ftype, copy=True)
        del view
        first = start // _PAGE * _PAGE
        self._map.madvise(mmap.MADV_DONTNEED, first, self._base + end - first)
        return out

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a tensor view is still alive; it keeps the mapping
                self._map.close()
        self._file.close()


class _Inert:
    """Stands in for a training-framework object inside an old checkpoint; keeps nothing, runs nothing."""

    def __setstate__(self, state) -> None:
        pass


# Objects found next to the weights in widely shared SD1 .ckpt files; they hold no weights.
_INERT_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [(_Inert, name) for name in _INERT_GLOBALS]
    allowed += [np.dtype, np.dtypes.Int64DType, np.dtypes.Float64DType, np.dtypes.Float32DType]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar")]
    return allowed


def _unsafe_message(path: Path, error: Exception, seen: list[str] = ()) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    listed = ", ".join(n for n in names if n not in _INERT_GLOBALS)
    if not listed:  # not a zip file: torch's message names the first global it refused
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        unsafe = [n for n in seen if not n.startswith(("torch.", "collections.OrderedDict", "numpy."))]
        listed = found.group(1) if found else ", ".join(unsafe[:5]) or "objects other than tensors"
    return (
        f"{path} is a pickle that needs unsafe unpickling to open: it refers to {listed}. A pickle can "
        "run arbitrary code when opened, so latentforge only opens .ckpt/.pt files with "
        "torch.load(weights_only=True) and refuses this one. Use the .safetensors release of this model "
        "if there is one; otherwise, only if you trust where the file came from, convert it once in a "
        "separate Python session:\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load({str(path)!r}, weights_only=False, map_location='cpu')\n"
        "    sd = sd.get('state_dict', sd)\n"
        "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() "
        "if isinstance(v, torch.Tensor)}, 'model.safetensors')"
    )


def _flatten_state_dict(obj, path: Path) -> dict[str, Tensor]:
    """Find the weights: a plain state dict, or one under ``state_dict`` (possibly nested), or BasicSR's
    ``params_ema`` (preferred, as BasicSR's own inference does) or ``params``; nested at most 8 deep (a
    pickle can make a dictionary that contains itself)."""
    for depth in range(9):
        inner = None
        if isinstance(obj, dict):
            inner = next((w for w in ("state_dict", "params_ema", "params") if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        if depth == 8:
            raise CheckpointError(f"{path} nests its weights more than 8 deep; it is not a model checkpoint")
        obj = obj[inner]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _pickle_too_big(path: Path, n: int | None) -> str:
    length = f"is {n} bytes long, more than" if n is not None else "is longer than"
    return (
        f"{path} is not a usable PyTorch checkpoint: its pickle (the description of its tensors) {length} "
        f"latentforge's limit of {MAX_PICKLE_BYTES} bytes (MAX_PICKLE_BYTES; a model's is well under 1 MB); the "
        "file is damaged, or holds far more than weights: convert it to .safetensors"
    )


def _check_zip(path: Path, size: int) -> None:
    """A zip checkpoint's members must be stored (``torch.save`` never compresses) and lie inside the file,
    so that no member can claim or inflate to more bytes than the file holds."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its zip structure is damaged ({short(str(e), 120)}); re-download it"
        ) from None
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size:
            raise CheckpointError(
                f"{path} is not a valid PyTorch checkpoint: zip member {short(m.filename)} is compressed "
                f"({m.compress_size} bytes claiming {m.file_size}); torch.save stores members uncompressed, so "
                "the file was not written by PyTorch"
            )
        if m.header_offset + m.file_size > size:
            raise CheckpointError(
                f"{path} is truncated or not a valid PyTorch checkpoint: zip member {short(m.filename)} claims "
                f"{m.file_size} bytes at offset {m.header_offset} of a {size}-byte file; re-download it"
            )
        if m.filename.endswith("/data.pkl") and m.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(_pickle_too_big(path, m.file_size))


# element sizes of the legacy (pre-zip) format's storage classes, by class name
_LEGACY_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# The pickle of a checkpoint (``data.pkl`` in a zip, the leading pickles of the legacy format) describes
# the tensors, about 100 bytes each: SDXL with an EMA copy is well under 1 MB. torch.load parses it with a
# pure-Python unpickler (a few microseconds per opcode), so a hostile multi-megabyte opcode stream would
# take minutes; 4 MiB is room for 40,000 tensors.
MAX_PICKLE_BYTES = 4 * 2**20


class _Scanned:
    """What a pickle's globals become while it is scanned: accepts anything, runs nothing."""

    name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:  # SETITEM(S) into an OrderedDict (every state_dict)
        pass

    def append(self, value) -> None:  # APPEND(S) into a list subclass
        pass

    def extend(self, values) -> None:
        pass


class _Scanner(pickle.Unpickler):
    """Parses a legacy-format pickle without building any of its objects, noting the storages it claims
    (``('storage', type, key, location, numel, ...)`` persistent ids)."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.claims: dict[object, int] = {}
        self.globals: list[str] = []

    def find_class(self, module: str, name: str):
        if len(self.globals) < 100:
            self.globals.append(f"{module}.{name}")
        return type("_Scanned", (_Scanned,), {"name": name})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            numel, kind = pid[4], getattr(pid[1], "name", "")
            if type(numel) is not int or numel < 0:
                raise CheckpointError(f"storage {short(pid[2])} claims {short(numel)} elements")
            key = pid[2] if isinstance(pid[2], (str, int)) else id(pid)
            self.claims[key] = max(self.claims.get(key, 0), numel * _LEGACY_ITEMSIZE.get(kind, 1))
        return None


def _check_legacy(path: Path, size: int) -> list[str]:
    """A pickle in PyTorch's legacy (pre-1.6, not zip) format declares each storage's size in the pickle
    and the loader allocates it before reading the data: the claims must fit in the file. The five pickles
    torch.load reads (magic number, protocol, system info, the object, the storage keys) are parsed first
    from the file's first MAX_PICKLE_BYTES in memory: together they must end within them (so torch's slow
    unpickler never sees more), and no length field (BINUNICODE, BINBYTES) can ask for more memory than
    that. Returns the globals the pickles name (for the message if torch.load refuses one)."""
    with open(path, "rb") as f:
        buf = io.BytesIO(f.read(MAX_PICKLE_BYTES))
    scanner = _Scanner(buf)
    try:
        magic = scanner.load()
        if magic == _LEGACY_MAGIC:
            # protocol version, system info, the object with its storages, then the list of storage
            # keys: torch.load unpickles all five, each with its pure-Python unpickler
            for _ in range(4):
                keys = scanner.load()
    except CheckpointError as e:
        raise CheckpointError(f"{path} is not a valid PyTorch checkpoint: {e}") from None
    except Exception as e:  # hostile bytes: any parse failure means a damaged file
        if size > MAX_PICKLE_BYTES and buf.tell() >= MAX_PICKLE_BYTES:
            raise CheckpointError(_pickle_too_big(path, None)) from None
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {short(str(e), 200)}); "
            "the file may be truncated or corrupt: re-download it"
        ) from None
    if magic != _LEGACY_MAGIC:  # a plain pickle, not written by torch.save: torch.load would refuse it too
        unsafe = [n for n in scanner.globals if not n.startswith(("torch.", "collections.OrderedDict"))]
        if unsafe:
            raise CheckpointError(_unsafe_message(path, ValueError(""), unsafe))
        raise CheckpointError(
            f"{path} is a pickle but not a PyTorch checkpoint (torch.save writes a zip file, or a pickle "
            "starting with its magic number); the file is damaged or another kind of file"
        )
    # torch.save writes the storages' names (text); the message names a type, as the list can be huge
    odd = [type(k).__name__ for k in keys if not isinstance(k, str)][:1] if isinstance(keys, list) else None
    if odd != []:
        found = f"a list holding a value of type {odd[0]}" if odd else f"of type {type(keys).__name__}"
        raise CheckpointError(
            f"{path} is not a valid PyTorch checkpoint: its last pickle must list the names of its storages, "
            f"but it is {found}; the file is damaged or was not written by torch.save"
        )
    claimed = sum(scanner.claims.values())
    if claimed > size:
        raise CheckpointError(
            f"{path} is truncated or not a valid PyTorch checkpoint: its pickle declares tensors of {claimed} "
            f"bytes but the file is {size} bytes long; re-download it"
        )
    return scanner.globals


def load_pickle(path: str | Path) -> object:
    """The object in a ``.ckpt``/``.pt``/``.pth``/``.bin`` pickle, read with ``torch.load(weights_only=True)``
    after the checks every pickle gets (a regular file; a zip with stored members inside the file, or a
    legacy pickle whose declared storages fit in it). Any failure is a CheckpointError naming the file."""
    path = Path(path)
    size = regular_file(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    seen: list[str] = []
    if is_zip:
        _check_zip(path, size)
    else:
        seen = _check_legacy(path, size)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(_unsafe_message(path, e, seen)) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}); it may be truncated") from None
    except Exception as e:  # torch.load parses hostile bytes: any failure means the file is not a checkpoint
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {short(str(e), 200)}); "
            "the file may be truncated or corrupt: re-download it"
        ) from None


class TorchFile:
    """A ``.ckpt``/``.pt``/``.bin`` pickle, opened with ``weights_only=True`` (memory-mapped if it can)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._tensors = _flatten_state_dict(load_pickle(self.path), self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        t = self._tensors[key]
        return t.to(dtype or t.dtype, copy=True).contiguous()

    def close(self) -> None:
        self._tensors = {}


TensorFile = SafetensorsFile | TorchFile
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def open_tensor_file(path: str | Path, suffix: str | None = None) -> TensorFile:
    """Open a weights file by its suffix (``.safetensors`` or a pickle suffix); ``suffix`` overrides the
    path's own (a Hugging Face cache blob has none: the link to it has)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():  # a broken or looping link: regular_file says which
        raise CheckpointError(f"{path} does not exist")
    regular_file(path)
    suffix = (suffix or path.suffix).lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchFile(path)
    raise CheckpointError(
        f"{path}: unknown weights file type {suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin"
    )
