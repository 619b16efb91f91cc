"""Reading tensors from checkpoint files one at a time, safely.

``.safetensors`` is memory-mapped; each tensor is copied out of the mapping and the mapped pages are
released at once, so resident memory grows by the loaded weights only. ``.ckpt``/``.pt``/``.bin``
pickles are opened only with ``torch.load(weights_only=True)``; a few training-framework objects that
old SD1 files carry next to the weights (and that hold no weights) are replaced by inert stand-ins;
anything else that needs unsafe unpickling is refused with an explanation.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import struct
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A file cannot be read as a checkpoint; the message says why and what to do."""


class SafetensorsFile:
    """A ``.safetensors`` file: header parsed eagerly (and validated), tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open while the mapping lives
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from e
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{self.path} is not a safetensors file: it is {size} bytes long (truncated or empty)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file (header length {n} > file size "
                f"{size}); it may be truncated or not a safetensors file at all"
            )
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path} has a corrupt safetensors header ({e}); re-download the file") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or self._base + end > size:
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: tensor {key!r} lies past the end of the file "
                    f"({self._base + end} > {size} bytes); re-download or re-save the file"
                )
            self._entries[key] = (dtype, shape, begin, end)
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


def _unsafe_message(path: Path, error: Exception) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    listed = ", ".join(n for n in names if n not in _INERT_GLOBALS) or str(error).splitlines()[0]
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


def _flatten_state_dict(obj) -> dict[str, Tensor]:
    """Find the weights: a plain state dict, or one under ``state_dict`` (possibly nested), or BasicSR's
    ``params_ema`` (preferred, as BasicSR's own inference does) or ``params``."""
    while isinstance(obj, dict):
        inner = next((w for w in ("state_dict", "params_ema", "params") if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, dict):
        raise CheckpointError(f"the pickle holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


class TorchFile:
    """A ``.ckpt``/``.pt``/``.bin`` pickle, opened with ``weights_only=True`` (memory-mapped if it can)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist or is not a file")
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                try:
                    obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise CheckpointError(_unsafe_message(self.path, e)) from None
            raise CheckpointError(f"{self.path} is not a readable checkpoint ({e}); it may be truncated") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{self.path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                "the file may be truncated or corrupt: re-download it"
            ) from None
        self._tensors = _flatten_state_dict(obj)

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


def open_tensor_file(path: str | Path) -> TensorFile:
    """Open a weights file by its suffix (``.safetensors`` or a pickle suffix)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchFile(path)
    raise CheckpointError(
        f"{path}: unknown weights file type {suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin"
    )
