"""latentforge's own bf16 attention kernel for CPUs with AVX512-BF16 and no AMX (issue 16).

On such CPUs (AMD Zen 4, Intel Cooper Lake) PyTorch's flash-attention kernel runs SD's narrow heads
(40 channels at the SD1.5 UNet's first level) at about a third of the bf16 matmul peak, and that
attention is a third of a UNet step. ``kernels/attention_bf16.cpp`` computes the same attention with
VDPBF16PS on K and V packed once per head and an online (flash) softmax in fp32: about 2x PyTorch's
kernel on those shapes (``benchmarks/bench_attention.py``). On CPUs with AMX, PyTorch's kernel uses the
tile unit and stays the choice.

The C++ source ships with the package and is compiled on first use with the system's C++ compiler
(``$CXX``, else ``g++``/``c++``; PyTorch's own ``torch.compile`` needs the same) into
``$LATENTFORGE_CACHE_DIR`` (default ``~/.cache/latentforge``)/kernels, named by a hash of the source,
flags and compiler, written atomically, then loaded with ctypes; nothing is downloaded. Where there is
no compiler or the build fails, attention stays on SDPA (one warning says why).

``LATENTFORGE_ATTENTION``: ``auto`` (default: the kernel on AVX512-BF16 CPUs without AMX), ``sdpa``
(never the kernel), ``kernel`` (the kernel on any CPU with AVX512-BF16, e.g. to test it on an AMX CPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "attention_bf16.cpp"
FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
    "-mfma",
]
# below this many scores (batch x heads x queries x keys) SDPA's lower call overhead wins
MIN_SCORES = 1 << 20
BUILD_TIMEOUT_S = 180

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def mode() -> str:
    value = os.environ.get("LATENTFORGE_ATTENTION", "auto").strip().lower() or "auto"
    if value not in ("auto", "sdpa", "kernel"):
        raise ValueError(f"LATENTFORGE_ATTENTION={value!r}: use auto, sdpa or kernel")
    return value


def wanted() -> bool:
    """Whether this CPU and ``LATENTFORGE_ATTENTION`` call for the kernel (before building it)."""
    m = mode()
    if m == "sdpa":
        return False
    flags = _state.get("flags")
    if flags is None:
        flags = _state["flags"] = _cpu_flags()
    if "avx512_bf16" not in flags:
        return False
    return m == "kernel" or "amx_bf16" not in flags


def cache_dir() -> Path:
    env = os.environ.get("LATENTFORGE_CACHE_DIR")
    if env:
        return Path(env) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "latentforge" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(directory: Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path. Raises
    RuntimeError saying what failed."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *FLAGS, version]).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"attention_bf16-{digest}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    except OSError:  # an unwritable cache: build for this process only
        directory = Path(tempfile.mkdtemp(prefix="latentforge-kernels-"))
        target = directory / target.name
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run(
            [cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: other processes see the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _function():
    """The loaded kernel, or None (not wanted here, or the build failed: warned once)."""
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        try:
            lib = ctypes.CDLL(str(build()))
            fn = lib.lf_attention_bf16
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_float, ctypes.c_int]
            fn.restype = ctypes.c_int
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("latentforge's bf16 attention kernel is not available (%s); using PyTorch's SDPA", exc)
            fn = None
        _state["fn"] = fn
        return fn


def reset() -> None:
    """Forget the loaded kernel and CPU flags (tests change the environment)."""
    with _lock:
        _state.clear()


def usable(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether ``attention_bf16`` takes these (B, N, C) inputs: bf16 CPU tensors, channels innermost,
    an even head width, no autograd, a problem big enough to pay off, and the kernel wanted here."""
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return False
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        return False
    b, nq, c = q.shape
    if c % heads or (c // heads) % 2 or k.shape[2] != c or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if b * heads * nq * k.shape[1] < MIN_SCORES:
        return False
    return wanted() and _function() is not None


def attention_bf16(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head for (B, N, C) bf16 inputs (C = heads * d); (B, Nq, C) out.
    Call only where ``usable`` said yes."""
    b, nq, c = q.shape
    nk, d = k.shape[1], c // heads
    out = torch.empty(b, nq, c, dtype=torch.bfloat16)
    rc = _function()(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, heads, nq, nk, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        d**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"attention kernel refused shape q={tuple(q.shape)} k={tuple(k.shape)} heads={heads}")
    return out
