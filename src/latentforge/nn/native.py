"""latentforge's own bf16 CPU kernels (issue 16): attention, GroupNorm with the SiLU after it, and 3x3
convolutions by Winograd's F(2x2, 3x3) (``nn/winograd.py``), for CPUs with AVX512-BF16 and no AMX.

On such CPUs (AMD Zen 4, Intel Cooper Lake) PyTorch's flash-attention kernel runs SD's narrow heads
(40 channels at the SD1.5 UNet's first level) at about a third of the bf16 matmul peak, and that
attention is a third of a UNet step. ``kernels/attention_bf16.cpp`` computes the same attention with
VDPBF16PS on K and V packed once per head and an online (flash) softmax in fp32: about 2x PyTorch's
kernel on those shapes (``benchmarks/bench_attention.py``). On CPUs with AMX, PyTorch's kernel uses the
tile unit and stays the choice. ``kernels/groupnorm_bf16.cpp`` does GroupNorm and the SiLU after it on
channels-last activations in two passes instead of four. ``kernels/winograd_bf16.cpp`` computes 3x3
convolutions with 2.25x fewer multiplications (``nn/winograd.py``). (The feed-forward's GEGLU is fused
differently: as post-ops of oneDNN's matmuls, ``nn/fused.py``.)

The C++ sources ship with the package, one shared library per ``Library`` (``kernels/*_bf16.cpp`` here;
``kernels/*_avx2.cpp``, the fp32 kernels of ``nn/native_avx2.py``), and are compiled on first use
with the system's C++ compiler (``$CXX``, else ``g++``/``c++``; ``torch.compile`` needs the same) into
``$LATENTFORGE_CACHE_DIR`` (default ``~/.cache/latentforge``)/kernels, named by a hash of the source,
flags and compiler, written atomically, then loaded with ctypes; nothing is downloaded. Where there is
no compiler or the build fails, attention stays on SDPA (one warning says why). The kernels split their
work over PyTorch's own OpenMP threads: built with ``-fopenmp``, the library needs ``libgomp.so.1`` and
the dynamic loader hands it the copy torch already loaded, so there is one pool of threads, started once
(``runtime()``). Threads started per call, the fallback where the compiler has no OpenMP, cost a
full-size SD1.5 UNet step 10% (each start also had to wake the other core).

``LATENTFORGE_KERNELS``: ``auto`` (default: the kernels on AVX512-BF16 CPUs without AMX), ``off``
(PyTorch's ops only), ``on`` (the kernels on any CPU with AVX512-BF16, e.g. to test them on an AMX CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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

from latentforge import allocator

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]


@dataclasses.dataclass(frozen=True)
class Library:
    """One shared library of kernels: its sources (``kernels/*_<name>.cpp`` and ``parallel.cpp``) and the
    instruction sets it is compiled for. ``bf16``: AVX-512 with BF16 (this module's kernels); ``avx2``: fp32
    kernels for AVX2 + FMA CPUs (``nn/native_avx2.py``)."""

    name: str
    isa_flags: tuple[str, ...]

    @property
    def sources(self) -> list[Path]:
        return sorted([*KERNEL_DIR.glob(f"*_{self.name}.cpp"), KERNEL_DIR / "parallel.cpp"])

    @property
    def flags(self) -> list[str]:
        return [*BASE_FLAGS, *self.isa_flags]


BF16 = Library("bf16", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"))
SOURCES = BF16.sources
FLAGS = BF16.flags
# the kernels' parallel loops on OpenMP: the library then needs libgomp.so.1, and the dynamic loader gives
# it the copy PyTorch already loaded (one runtime, one pool of threads; tests/test_native_kernels.py)
OPENMP_FLAGS = ["-fopenmp"]
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


def cpu_flags() -> set[str]:
    """This CPU's flags from /proc/cpuinfo (read once; ``reset`` forgets them)."""
    flags = _state.get("flags")
    if flags is None:
        flags = _state["flags"] = _cpu_flags()
    return flags


def mode() -> str:
    value = os.environ.get("LATENTFORGE_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto", "off", "on"):
        raise ValueError(f"LATENTFORGE_KERNELS={value!r}: use auto, off or on")
    return value


def wanted() -> bool:
    """Whether this CPU and ``LATENTFORGE_KERNELS`` call for the kernels (before building them)."""
    m = mode()
    if m == "off":
        return False
    flags = cpu_flags()
    if "avx512_bf16" not in flags:
        return False
    return m == "on" or "amx_bf16" not in flags


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


def build(directory: Path | None = None, openmp: bool = True, library: Library = BF16) -> Path:
    """Compile the kernels (or find them already compiled) and return the shared library's path. Raises
    RuntimeError saying what failed. ``openmp``: first try the build whose parallel loops run on OpenMP
    (``OPENMP_FLAGS``: PyTorch's own thread pool, see the module's text); where the compiler has no
    OpenMP, or with ``openmp=False``, the build that starts threads per call."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources, plain = library.sources, library.flags
    headers = sorted(KERNEL_DIR.glob("*.h"))
    code = b"".join(p.name.encode() + p.read_bytes() for p in [*sources, *headers])
    directory = directory or cache_dir()
    variants = [[*plain, *OPENMP_FLAGS], plain] if openmp else [plain]
    names = []
    for flags in variants:
        digest = hashlib.sha256(code + " ".join([cxx, *flags, version]).encode()).hexdigest()[:16]
        names.append(f"latentforge-{library.name}-{digest}.so")
    if (directory / names[0]).exists():
        return directory / names[0]
    refused = None  # why the OpenMP build failed, remembered once the plain one has built
    if openmp:
        failed = directory / f"{names[0]}.failed"  # this compiler refused OpenMP before: not tried again
        if not failed.exists():
            try:
                return _compile(cxx, variants[0], directory, names[0], sources)
            except RuntimeError as exc:
                log.info("building latentforge's kernels with OpenMP failed (%s); building them without", exc)
                refused = exc
        if (directory / names[1]).exists():
            return directory / names[1]
    target = _compile(cxx, plain, directory, names[-1], sources)
    if refused is not None:  # the plain build worked: it was OpenMP the compiler refused
        with contextlib.suppress(OSError):
            (target.parent / f"{names[0]}.failed").write_text(str(refused)[-2000:] + "\n")
    return target


def _compile(cxx: str, flags: list[str], directory: Path, name: str, sources: list[Path]) -> Path:
    target = directory / name
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
            [cxx, *flags, "-o", tmp, *map(str, sources)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {KERNEL_DIR}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: other processes see the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _library():
    """The loaded bf16 kernels, or None (the build failed: warned once)."""
    return load_library(BF16, _load)


def load_library(library: Library, declare):
    """``library`` built and loaded (``declare(path)`` loads it and declares its functions' signatures),
    once per process; None where the build failed (warned once)."""
    key = ("lib", library.name)
    if key in _state:
        return _state[key]
    with _lock:
        if key in _state:
            return _state[key]
        lib = None
        try:
            lib = declare(build(library=library))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("latentforge's %s kernels are not available (%s); using PyTorch's ops", library.name, exc)
            lib = None
        _state[key] = lib
        return lib


def _load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` (``build``'s) loaded, its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.lf_attention_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_float, ctypes.c_int]
    lib.lf_groupnorm_bf16.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    )
    lib.lf_wino_input_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    lib.lf_wino_conv_bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_int]
    lib.lf_wino_set_loop.argtypes = [ctypes.c_int]
    lib.lf_wino_filter_bf16.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int]
    )
    kernels = ("lf_attention_bf16", "lf_groupnorm_bf16", "lf_wino_input_bf16", "lf_wino_conv_bf16")
    for fn in [getattr(lib, name) for name in kernels] + [lib.lf_wino_filter_bf16, lib.lf_parallel_runtime]:
        fn.restype = ctypes.c_int
    lib.lf_parallel_runtime.argtypes = []
    return lib


def runtime() -> str | None:
    """Where the kernels' parallel loops run: ``"openmp"`` (OpenMP's threads: PyTorch's pool),
    ``"threads"`` (threads started per call) or None (no kernels)."""
    lib = _library()
    if lib is None:
        return None
    return "openmp" if lib.lf_parallel_runtime() == 1 else "threads"


def ready() -> bool:
    """The kernels are wanted here and built, and the caller is not being traced by ``torch.compile`` (a
    ctypes call on tensors' addresses cannot be traced: the compiled graph gets PyTorch's ops)."""
    return not torch.compiler.is_compiling() and wanted() and _library() is not None


def reset() -> None:
    """Forget the loaded kernel and CPU flags (tests change the environment)."""
    with _lock:
        _state.clear()


def attention_shapes_ok(
    q: Tensor, k: Tensor, v: Tensor, heads: int, dtype: torch.dtype, multiple: int, max_width: int, min_scores: int
) -> bool:
    """What every attention kernel asks of its (B, N, C) inputs: ``dtype`` CPU tensors, channels innermost, a
    head width that is a multiple of ``multiple`` and at most ``max_width``, no autograd, at least
    ``min_scores`` scores (batch x heads x queries x keys)."""
    if not (q.dtype == k.dtype == v.dtype == dtype):
        return False
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return False
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        return False
    b, nq, c = q.shape
    d = c // heads
    if c % heads or d % multiple or d > max_width or k.shape[2] != c or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return b * heads * nq * k.shape[1] >= min_scores


def call_attention(fn, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Run an attention kernel ``fn`` (``lf_attention_bf16`` or ``lf_attention_fp32``: the same arguments) on
    (B, N, C) inputs checked by ``attention_shapes_ok``; (B, Nq, C) out in the inputs' dtype."""
    b, nq, c = q.shape
    nk, d = k.shape[1], c // heads
    out = torch.empty(b, nq, c, dtype=q.dtype)
    rc = fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, heads, nq, nk, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        d**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"attention kernel refused shape q={tuple(q.shape)} k={tuple(k.shape)} heads={heads}")
    return out


def attention_usable(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether ``attention_bf16`` takes these (B, N, C) inputs: bf16 CPU tensors, channels innermost,
    an even head width, no autograd, a problem big enough to pay off, and the kernel wanted here."""
    return attention_shapes_ok(q, k, v, heads, torch.bfloat16, 2, 1 << 30, MIN_SCORES) and ready()


def attention_bf16(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head for (B, N, C) bf16 inputs (C = heads * d); (B, Nq, C) out.
    Call only where ``attention_usable`` said yes."""
    return call_attention(_library().lf_attention_bf16, q, k, v, heads)


def groupnorm_usable(x: Tensor, groups: int) -> bool:
    """Whether ``group_norm_bf16`` takes ``x``: bf16 CPU (N, C, H, W) in channels-last memory, no autograd."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[1] % groups == 0
        and x.numel() > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and ready()
    )


def group_norm_bf16(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, silu: bool = False
) -> Tensor:
    """GroupNorm (Wu & He 2018) of channels-last bf16 ``x`` with fp32/double statistics, then SiLU when
    ``silu``; one rounding to bf16. Call only where ``groupnorm_usable`` said yes."""
    n, c, h, w = x.shape
    weight = weight.to(torch.bfloat16).contiguous() if weight is not None else None
    bias = bias.to(torch.bfloat16).contiguous() if bias is not None else None
    out = torch.empty_like(x, memory_format=torch.channels_last)
    rc = _library().lf_groupnorm_bf16(
        x.data_ptr(), weight.data_ptr() if weight is not None else None,
        bias.data_ptr() if bias is not None else None, out.data_ptr(),
        n, h * w, c, groups, eps, int(silu), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"GroupNorm kernel refused shape {tuple(x.shape)} with {groups} groups")
    return out


WINOGRAD_GROUP = 14  # tiles per group in V's layout (RT in kernels/winograd_bf16.cpp)


def winograd_input(x: Tensor, rows: tuple[int, int], out: Tensor) -> Tensor:
    """The Winograd input transform of channels-last bf16 ``x`` (N, C, H, W) for the tile rows ``rows`` =
    [ty0, ty1) of ceil(H/2) x ceil(W/2) tiles per image: V (groups, 16, 14, C) bf16, 14 tiles to a group
    (``kernels/winograd_bf16.cpp``), a view of ``out`` (a contiguous bf16 buffer at least that large).
    Call only where ``winograd.usable`` said yes."""
    n, c, h, w = x.shape
    ty0, ty1 = rows
    tiles = n * (ty1 - ty0) * ((w + 1) // 2)
    shape = ((tiles + WINOGRAD_GROUP - 1) // WINOGRAD_GROUP, 16, WINOGRAD_GROUP, c)
    numel = shape[0] * 16 * WINOGRAD_GROUP * c
    if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < numel:
        raise ValueError(f"the Winograd buffer must be contiguous bf16 with at least {numel} elements")
    v = out.view(-1)[:numel].view(shape)
    rc = _library().lf_wino_input_bf16(x.data_ptr(), v.data_ptr(), n, h, w, c, ty0, ty1, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"Winograd input transform refused shape {tuple(x.shape)}")
    return v


def winograd_conv(
    v: Tensor, u: Tensor, bias: Tensor | None, out: Tensor, in_channels: int, rows: tuple[int, int]
) -> Tensor:
    """The 3x3 convolution from V (``winograd_input`` for the same tile ``rows``) and the packed filters U,
    ``bias`` fp32 added, written into ``out`` ((N, Cout, H, W) bf16 channels-last: the output rows of
    those tile rows)."""
    n, cout, h, w = out.shape
    ty0, ty1 = rows
    rc = _library().lf_wino_conv_bf16(
        v.data_ptr(), u.data_ptr(), bias.data_ptr() if bias is not None else None, None, out.data_ptr(),
        n, h, w, in_channels, cout, ty0, ty1, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"Winograd convolution refused {in_channels} -> {tuple(out.shape)}, tile rows {rows}")
    return out


def winograd_filters(weight: Tensor) -> Tensor:
    """U = G g G^T of bf16 (Cout, C, 3, 3) filters (any strides), packed (Cout/32, 16, C/2, 32, 2) bf16."""
    cout, c = weight.shape[:2]
    u = allocator.mapped_empty((cout // 32, 16, c // 2, 32, 2), torch.bfloat16)  # long-lived: off the heap
    rc = _library().lf_wino_filter_bf16(
        weight.data_ptr(), *weight.stride(), u.data_ptr(), cout, c, torch.get_num_threads()
    )
    if rc != 0:
        raise RuntimeError(f"Winograd filter transform refused shape {tuple(weight.shape)}")
    return u


WINOGRAD_LOOPS = {"auto": 0, "few-tiles": 1, "many-tiles": 2}


def winograd_loop(name: str) -> None:
    """Which loop the Winograd convolution takes (``kernels/winograd_bf16.cpp``): ``auto`` (by shape, the
    default), ``few-tiles`` or ``many-tiles``; all give the same bits (for benchmarks and tests)."""
    if name not in WINOGRAD_LOOPS:
        raise ValueError(f"Winograd loop {name!r}: use one of {', '.join(WINOGRAD_LOOPS)}")
    _library().lf_wino_set_loop(WINOGRAD_LOOPS[name])
