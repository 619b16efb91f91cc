"""Which dtype and memory layout run fastest on the machine at hand (the "fast path" choices).

``load(dtype=None)`` asks ``auto_dtype``: bf16 on CPUs with AVX512-BF16 or AMX for full-size models
(for small models the step is overhead-bound and bf16 gains nothing), fp16 on CUDA GPUs, fp32
otherwise. The environment variable ``LATENTFORGE_DTYPE`` (fp32, bf16, fp16) overrides the automatic
choice; an explicit ``dtype=`` overrides both.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

AUTO_BF16_MIN_UNET_PARAMS = 100_000_000

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name (fp32, bf16, fp16 and aliases); None and torch dtypes pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


@functools.lru_cache(maxsize=1)
def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default cpu); ValueError, saying what to use instead, for a name torch does
    not know or a device this PyTorch build or machine does not have (``--device cuda`` on a CPU build)."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not available.get(dev.type, lambda: False)():
        raise ValueError(f"device {str(dev)!r} is not available with this PyTorch build on this machine; use cpu")
    return dev


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def auto_dtype(device: torch.device, unet_params: int) -> tuple[torch.dtype, str]:
    """(dtype, why) for a model whose UNet has ``unet_params`` parameters."""
    env = os.environ.get("LATENTFORGE_DTYPE")
    if env:
        return parse_dtype(env), f"LATENTFORGE_DTYPE={env}"
    if device.type == "cuda":
        return torch.float16, "CUDA GPU"
    if device.type == "cpu" and cpu_supports_bf16() and unet_params >= AUTO_BF16_MIN_UNET_PARAMS:
        return torch.bfloat16, "CPU with native bf16 (AVX512-BF16/AMX)"
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.float32, "small model (bf16 does not pay off)"
    return torch.float32, "no fast reduced-precision arithmetic on this device"


def vae_dtype(dtype: torch.dtype, fp16_safe: bool, device: torch.device) -> torch.dtype:
    """A VAE that overflows in fp16 (the SDXL VAE: NaNs, black images; ``Family.vae_fp16_safe`` is
    False) runs in bf16 or fp32 instead."""
    if dtype == torch.float16 and not fp16_safe:
        return torch.bfloat16 if supports_bf16(device) else torch.float32
    return dtype


def to_fast_layout(module: torch.nn.Module, *, vae: bool = False) -> torch.nn.Module:
    """Convolution weights in channels-last (NHWC) layout: oneDNN and cuDNN run these convolutions
    faster (measured here: SD VAE decode 20%, UNet 5% on CPU), activations follow the weights, and the
    transformer blocks' NCHW <-> tokens reshapes become free views. Numerically the same computation.

    Except a VAE on a CUDA device, which stays contiguous: PyTorch's CUDA GroupNorm returns contiguous
    activations, so every norm of a channels-last VAE converts full-resolution activations back and
    forth (H200, fp16 decode: SD1.5 26.6 -> 21.9 ms, SDXL 127 -> 86 ms contiguous; the UNet stays
    channels-last, SD1.5 step 35.5 -> 22.2 ms: ``benchmarks/profile_step.py --layout``)."""
    param = next(module.parameters(), None)
    if vae and param is not None and param.device.type == "cuda":
        return module
    return module.to(memory_format=torch.channels_last)


# Host-device traffic inside the sampling loop. A plain CPU-to-CUDA copy waits until the GPU has run
# everything queued before it (PyTorch synchronizes the stream after a pageable copy), so the host can no
# longer queue the next step while the GPU works: on a fast GPU a few such waits per step cost more than
# the step's arithmetic. These helpers put values on the device without that wait.


def filled(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (a 1-D tensor, any dtype) as float32 on ``device``. When they are all equal (one sigma
    or timestep for the whole batch, the usual case) the tensor is filled on the device from a Python
    number, which needs no copy; otherwise they are copied as ``to_device`` does."""
    if values.device == device:
        return values.to(torch.float32)
    if values.device.type == "cpu" and values.numel() > 0:
        first = float(values[0])
        if bool((values == first).all()):
            return torch.full(values.shape, first, dtype=torch.float32, device=device)
    return to_device(values, device, torch.float32)


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (a CPU tensor the caller will not change afterwards) on ``device`` in ``dtype``. To a CUDA
    device it goes through page-locked memory, asynchronously: the copy is queued behind the GPU's work
    instead of waiting for it (PyTorch keeps the page-locked buffer until the copy has run)."""
    dtype = dtype or t.dtype
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device=device, dtype=dtype)
    return t.to(dtype).pin_memory().to(device, non_blocking=True)
