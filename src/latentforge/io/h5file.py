"""HDF5 weight files (Keras ``.weights.h5``) read as tensors, with the same interface as ``io.tensorfile``'s
readers (``keys``, ``shape``, ``dtype``, ``read``, ``close``).

HDF5 holds only arrays and attributes: reading it runs no code. h5py is an optional dependency (the
``hed`` extra): without it, opening a file is an ``H5pyMissing`` error that says how to install it. The
datasets are listed from the file's metadata (names, shapes, dtypes) without reading any data, so
callers check names and shapes before ``read``; the listing stops at ``MAX_DATASETS``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from latentforge.io.tensorfile import CheckpointError, regular_file, short

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_DATASETS = 10_000
_FLOATS = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}


class H5pyMissing(CheckpointError):
    """An HDF5 file was given but h5py is not installed."""


def is_hdf5(path: str | Path) -> bool:
    """True when the file begins with the HDF5 signature (an HDF5 file with no user block)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


class H5File:
    """The datasets of an HDF5 file by their slash-separated paths (``block1/layers/conv2d/vars/0``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        try:
            import h5py
        except ImportError:
            raise H5pyMissing(
                f"{self.path} is an HDF5 (Keras) weights file, and reading it needs the h5py package: "
                "pip install h5py (or latentforge[hed])"
            ) from None
        regular_file(self.path)
        if not is_hdf5(self.path):
            raise CheckpointError(f"{self.path} is not an HDF5 file (it lacks the HDF5 signature); re-download it")
        try:
            self._file = h5py.File(self.path, "r")
        except Exception as e:  # h5py parses hostile bytes: any failure means the file is unreadable
            raise CheckpointError(
                f"{self.path} could not be read as an HDF5 file ({type(e).__name__}: {short(str(e), 200)}); the "
                "file may be truncated or corrupt: re-download it"
            ) from None
        self._datasets: dict[str, object] = {}

        def visit(name: str, obj) -> bool | None:
            if isinstance(obj, h5py.Dataset):
                self._datasets[name] = obj
            return True if len(self._datasets) > MAX_DATASETS else None

        try:
            self._file.visititems(visit)
        except Exception as e:
            self.close()
            raise CheckpointError(
                f"{self.path}: the HDF5 file's structure could not be read ({type(e).__name__}: "
                f"{short(str(e), 200)}); the file may be corrupt: re-download it"
            ) from None
        if len(self._datasets) > MAX_DATASETS:
            self.close()
            raise CheckpointError(f"{self.path} has more than {MAX_DATASETS} datasets: it is not a weights file")

    def keys(self) -> list[str]:
        return list(self._datasets)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._datasets[key].shape)  # type: ignore[attr-defined]

    def dtype(self, key: str) -> torch.dtype:
        """The dataset's float dtype; anything else (integers, strings, compounds) reads as int64, which
        loaders refuse as "not floating point"."""
        return _FLOATS.get(self._datasets[key].dtype, torch.int64)  # type: ignore[attr-defined]

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        ds = self._datasets[key]
        if ds.dtype not in _FLOATS:  # type: ignore[attr-defined]
            raise CheckpointError(f"{self.path}: dataset {key!r} is not floating point ({ds.dtype})")  # type: ignore[attr-defined]
        try:
            arr = np.asarray(ds[()])  # type: ignore[index]
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: dataset {key!r} could not be read ({type(e).__name__}: {short(str(e), 200)}); the "
                "file may be truncated or corrupt: re-download it"
            ) from None
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.to(dtype) if dtype is not None else t

    def close(self) -> None:
        self._datasets = {}
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
            self._file = None


__all__ = ["HDF5_SIGNATURE", "MAX_DATASETS", "H5File", "H5pyMissing", "is_hdf5"]
