"""Freed CPU memory reused instead of page-faulted in anew: during a sampler's steps, and on request while
the VAE runs (issue 16).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and unmaps them on ``free``, so each such tensor costs one page
fault per 4 KiB page on first touch, the kernel zeroing every page. The VAE's activations at 512 px are
32-128 MB each: one SD VAE decode allocates about 2 GB of fresh pages (450,000-550,000 minor faults).
The UNet's bf16 activations at 512 px are below the threshold; its fp32 ones are not (the first level's
GEGLU product, (8192, 2560), is 84 MB): a full-size SD1.5 fp32 CFG step faulted 120,000-190,000 pages.

``reusing("steps")`` (entered around a sampler's run on the CPU, ``pipelines/generate.py``) and
``reusing()`` (entered by ``AutoencoderKL.encode_moments`` and ``decode`` for CPU tensors) act where
``LATENTFORGE_MALLOC`` asks: ``steps`` (the default) the sampler's steps only, ``reuse`` the VAE too,
``system`` neither. Acting, it asks glibc (``mallopt``) to serve every block from its heap
(``M_MMAP_MAX`` = 0) and not to trim the heap's free top (``M_TRIM_THRESHOLD`` at its largest), so a
freed activation's pages serve the next one; on leaving, the settings return to what glibc's own
adaptive thresholds reach in a warm PyTorch process (mmap above 32 MB, trim above 64 MB) and
``malloc_trim`` hands the free heap back. It was the default until the decode's peak mattered more than
its page faults: the 32-134 MB blocks of different sizes fragment the heap, so a decode's peak RSS is
0.6-0.8 GB higher than with glibc's mappings in a process that only decodes, for a decode at most 6%
faster (``benchmarks/bench_fused.py``, two runs: 4.23-4.28 s against 4.52 s, then 5.22 against 5.25 s;
peak 1.87-2.11 against 1.22-1.31 GB). A sampler's steps allocate the same blocks every step, so the heap
reaches its size at the first step and stays there: the fp32 SD1.5 step above then faults nothing and ran
0.2-0.24 s (2.5-3%) faster, for 0.1 GB more while sampling, handed back before the decode. Contexts nest
and may be entered from several threads (a count; the last one out restores).

``mapped_empty`` gives long-lived buffers (the Winograd filters and transform buffer of ``nn.winograd``)
their own anonymous mapping, outside the heap, whatever the mode: in the middle of the heap they would
keep the freed blocks around them from merging.

Outside those contexts glibc is left alone. ``release`` (``malloc_trim``) returns free
heap memory after a model is unloaded (the server's model cache calls it) and after a packed session has
swapped its weights out (``nn.packed``). Elsewhere than glibc (macOS, Windows, musl) all of this does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import mmap
import os
import sys
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

ENV = "LATENTFORGE_MALLOC"
# mallopt parameters (glibc's malloc.h) and the values restored on leaving: glibc's adaptive maximum for
# the mmap threshold (32 MB on 64-bit) and the trim threshold it pairs with (twice that), the default
# maximum count of mmapped blocks
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1
RESTORE = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))

_lock = threading.Lock()
_state: dict[str, object] = {"depth": 0}


def _glibc():
    """glibc's handle, or None elsewhere."""
    if "libc" not in _state:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                candidate = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if all(hasattr(candidate, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
                    lib = candidate
            except OSError:
                lib = None
        _state["libc"] = lib
    return _state["libc"]


def wanted(part: str = "vae") -> bool:
    """Whether ``part`` ("steps": a sampler's steps; "vae": the VAE's calls) runs with freed blocks reused,
    by ``LATENTFORGE_MALLOC``: ``steps`` (the default) the steps only, ``reuse`` both, ``system`` neither."""
    value = os.environ.get(ENV, "steps").strip().lower() or "steps"
    if value not in ("steps", "reuse", "system"):
        raise ValueError(f"{ENV}={value!r}: use 'steps' (the default), 'reuse' or 'system'")
    return value == "reuse" or (value == "steps" and part == "steps")


def active() -> bool:
    """Whether freed large blocks are being kept for reuse right now."""
    return bool(_state["depth"])


@contextlib.contextmanager
def reusing(part: str = "vae") -> Iterator[bool]:
    """Inside: large blocks come from the heap and freed ones are reused, where ``wanted(part)`` (yields
    whether it is so)."""
    libc = _glibc() if wanted(part) else None
    if libc is None:
        yield False
        return
    with _lock:
        ok = _state["depth"] > 0 or bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX))
        if ok:
            _state["depth"] += 1
    if not ok:
        log.info("glibc refused the mallopt settings; large tensors keep their page faults")
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for param, value in RESTORE:
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


def release() -> bool:
    """Return free heap memory to the system (``malloc_trim(0)``); True when some was returned."""
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        return bool(libc.malloc_trim(0))


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor in its own anonymous memory mapping (page-aligned, zero
    pages until written), freed when the last tensor viewing it goes: for buffers that live across many
    allocations and must not split malloc's heap (see the module docstring)."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # not Python's default MAP_SHARED: shared memory faults slower
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=dtype, count=count).view(shape)
