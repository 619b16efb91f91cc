"""Building a network from a file's tensors: strict key and shape checks, then one tensor at a time.

A ``Ref`` says where one of the module's tensors lives in a file and how to turn it into the module's
tensor (a slice of a fused projection, a transpose, a reshape). ``build`` makes the module on the meta
device, checks every key and shape, then reads each tensor straight into the caller's dtype and device
and assigns it, so peak memory is the loaded weights plus one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentforge.io.tensorfile import CheckpointError, TensorFile


class LoadError(ValueError):
    """Weights do not fit the network they are meant for; the message lists every problem by name."""


@dataclass(frozen=True)
class Ref:
    file: TensorFile
    key: str
    shape: tuple[int, ...]  # shape after ``transform``
    transform: Callable[[Tensor], Tensor] | None = None


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = "\n".join(f"    {i}" for i in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def check(expected: Mapping[str, tuple[int, ...]], refs: Mapping[str, Ref], what: str, source: str) -> None:
    """Raise LoadError naming every missing key, unexpected key and wrong shape."""
    missing = sorted(expected.keys() - refs.keys())
    unexpected = sorted(refs.keys() - expected.keys())
    shapes = sorted(
        f"{k}: file {list(refs[k].shape)}, model {list(expected[k])}"
        for k in expected.keys() & refs.keys()
        if tuple(refs[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        parts = [f"the {what} weights in {source} do not match the {what} architecture:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("shape mismatches", shapes))
        parts.append(
            "  The file may be damaged, or made for a different model; `latentforge inspect FILE` shows "
            "what was detected."
        )
        raise LoadError("\n".join(parts))


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf: one min/max reduction (NaN propagates through both, an Inf is
    one of them). It only reads the tensor, so it costs a fraction of the copy out of the file."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):  # dtypes without a min/max kernel (float8)
        lo, hi = torch.aminmax(t.float())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def require_finite(t: Tensor, where: str, error: type[Exception] = CheckpointError, then: str = "") -> Tensor:
    """``t`` when it holds no NaN/Inf; else ``error`` saying ``where`` (a file and tensor name) holds them,
    then ``then`` (what it means; by default: the file is damaged). The one check of every adapter and
    upscaler reader: a non-finite weight would turn every image it touches black."""
    if not all_finite(t):
        raise error(f"{where} holds NaN or Inf values; {then or 'the file is damaged: re-download it'}")
    return t


_all_finite = all_finite


def _non_finite_message(ref: Ref, t: Tensor, what: str, source: str) -> str:
    bad = ~torch.isfinite(t)
    nan, count = int(torch.isnan(t).sum()), int(bad.sum())
    kinds = " and ".join(k for k, n in (("NaN", nan), ("Inf", count - nan)) if n)
    file = getattr(ref.file, "path", source)
    original = ref.file.read(ref.key)
    if t.dtype != original.dtype and _all_finite(original):
        largest = float(original.float().abs().max())
        return (
            f"the {what} weights in {source}: tensor {ref.key!r} of {file} (largest magnitude {largest:.4g}) does "
            f"not fit in {str(t.dtype).removeprefix('torch.')}: {count} of {t.numel()} values become {kinds}; "
            "load the model in another dtype (fp32 or bf16: --dtype fp32)"
        )
    return (
        f"the {what} weights in {source}: tensor {ref.key!r} of {file} holds {count} {kinds} value(s) of "
        f"{t.numel()}; the file is damaged or was saved from a model whose training diverged: re-download it "
        "or use another checkpoint"
    )


class _ReadCache:
    """Keeps the last two tensors read, so q, k and v split from one fused tensor read it once. Each
    tensor is checked for NaN/Inf as it is read (a damaged file or a cast that overflows, e.g. fp32
    weights beyond 65504 loaded in fp16), before it is assigned to any network."""

    def __init__(self, what: str, source: str) -> None:
        self._items: dict[tuple[int, str, torch.dtype | None], Tensor] = {}
        self.what, self.source = what, source

    def read(self, ref: Ref, dtype: torch.dtype | None) -> Tensor:
        file_dtype = ref.file.dtype(ref.key)
        target = dtype if dtype is not None and file_dtype.is_floating_point else None
        key = (id(ref.file), ref.key, target)
        if key not in self._items:
            if len(self._items) >= 2:
                self._items.pop(next(iter(self._items)))
            t = ref.file.read(ref.key, target)
            if not _all_finite(t):
                raise LoadError(_non_finite_message(ref, t, self.what, self.source))
            self._items[key] = t
        return self._items[key]


def build(
    factory: Callable[[], nn.Module],
    refs: Mapping[str, Ref],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    what: str,
    source: str,
) -> nn.Module:
    """Make ``factory()``'s module and fill it from ``refs`` (strict: every key, every shape; no NaN/Inf:
    a tensor holding them is refused with its file and name before anything is assigned)."""
    with torch.device("meta"):
        module = factory()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check(expected, refs, what, source)
    not_float = sorted(
        f"{k}: {str(refs[k].file.dtype(refs[k].key)).removeprefix('torch.')}"
        for k, v in module.state_dict().items()
        if v.is_floating_point() and not refs[k].file.dtype(refs[k].key).is_floating_point
    )
    if not_float:
        raise LoadError(
            f"the {what} weights in {source} are not all floating point:\n"
            + _listing("tensors stored as integers or booleans", not_float)
            + "\n  The file is damaged or not a model checkpoint."
        )
    cache = _ReadCache(what, source)
    state: dict[str, Tensor] = {}
    for key in expected:
        ref = refs[key]
        t = cache.read(ref, dtype)
        if ref.transform is not None:
            t = ref.transform(t)
        state[key] = t.to(device)
    del cache
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def identity_refs(file: TensorFile, prefix: str, keys: list[str] | None = None) -> dict[str, Ref]:
    """Refs for every key under ``prefix``, with the prefix removed."""
    keys = file.keys() if keys is None else keys
    return {k[len(prefix) :]: Ref(file, k, file.shape(k)) for k in keys if k.startswith(prefix)}
