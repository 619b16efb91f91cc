"""Convolution weights packed once into oneDNN's blocked layout (issue 16, "weights prepared once").

PyTorch's CPU convolution hands oneDNN the weight in the plain OIHW layout, and oneDNN reorders it into
its blocked layout on every call (issue 16 traced all 98 SD1.5 UNet convolutions repacked every step).
``pack_convolutions`` gives each ``nn.Conv2d`` a forward that calls the oneDNN convolution
(``torch.ops.mkldnn._convolution_pointwise``, the op inductor's freezing pass emits) with a weight
reordered once by ``torch.ops.mkldnn._reorder_convolution_weight`` for the input's shape; it is
reordered again only when the weight changes (its version counter: LoRA merges through the patcher
copy in place), is replaced (another dtype or device), or the input shape changes. The result is the
same convolution (tested against ``nn.Conv2d``); the cost is a second copy of the packed weights in
memory. Other inputs (GPU, gradients, mixed dtypes, string padding) use the module's own forward.

``packed_session(module)`` is the default during a full-size CPU generation (``pipelines/generate.py``)
and costs no memory: inside it each convolution, once packed, swaps its plain weight out for an empty
placeholder (the packed copy is the only one), repacks from the packed copy (``to_dense``) when the input
shape changes, and on exit every plain weight is put back bit for bit and the modules are plain
``nn.Conv2d`` again. Code that must read a weight inside a session calls ``materialize`` first (the
patcher does); reading a swapped-out weight otherwise fails with a shape error, never silently.
``pack_convolutions`` (``--pack-weights``) keeps both copies across generations instead.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# convolutions inside a packed_session: None, or once their plain weight is swapped out for the packed
# copy, that weight's (shape, strides) (a channels-last weight comes back channels-last)
_SESSION: weakref.WeakKeyDictionary[nn.Module, tuple | None] = weakref.WeakKeyDictionary()
# weight parameter id -> its convolution, for materialize(param)
_SWAPPED: dict[int, nn.Module] = {}
# one session at a time per module (generations on the same UNet from two threads take turns)
_SESSION_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def available() -> bool:
    """True when this PyTorch has the oneDNN ops (CPU builds with mkldnn)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


class PackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, state dict and pickling) whose CPU forward uses a weight
    packed once. Made by ``pack_convolutions`` changing the module's class; the packed copy lives in a
    module-level weak table, so copies and saved modules never carry it."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        swapped = _SESSION.get(self) is not None
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.dim() != 4
            or x.dtype != w.dtype
            or (b is not None and b.dtype != w.dtype)
            or isinstance(self.padding, str)
            or self.padding_mode != "zeros"
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        ):
            if swapped:
                _put_back(self)
            return super().forward(x)
        cache = _CACHE.get(self)
        if swapped:  # the packed copy is the only one: repack from it for another input shape
            if cache["shape"] != tuple(x.shape):
                cache = _pack(self, cache["weight"].to_dense(), x, cache["key"])
        else:
            key = (id(w), w._version, w.dtype)
            if cache is None or cache["key"] != key or cache["shape"] != tuple(x.shape):
                # one packed copy per convolution: for the latest weight and input shape
                cache = _pack(self, w.detach(), x, key)
            if self in _SESSION:
                _swap_out(self)
        padding, stride, dilation, groups = cache["args"]
        return torch.ops.mkldnn._convolution_pointwise(
            x, cache["weight"], b, padding, stride, dilation, groups, "none", [], ""
        )


def _pack(conv: nn.Conv2d, weight: Tensor, x: Tensor, key: tuple) -> dict:
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape))
    cache = _CACHE[conv] = {"key": key, "shape": tuple(x.shape), "weight": packed, "args": args}
    return cache


def _swap_out(conv: nn.Conv2d) -> None:
    w = conv.weight
    layout = (w.shape, w.stride())
    with torch.inference_mode(False):  # a normal (not inference) tensor, as the parameter's data was
        w.data = torch.empty(0, dtype=w.dtype, device=w.device)
    _SESSION[conv] = layout
    _SWAPPED[id(w)] = conv


def _put_back(conv: nn.Conv2d) -> None:
    """The plain weight back from the packed copy (exact: a reorder), the packed copy kept."""
    layout = _SESSION.get(conv)
    if layout is None:
        return
    with torch.inference_mode(False):
        plain = torch.empty_strided(*layout, dtype=conv.weight.dtype, device=conv.weight.device)
        conv.weight.data = plain.copy_(_CACHE[conv]["weight"].to_dense())
    _SESSION[conv] = None
    _SWAPPED.pop(id(conv.weight), None)


def materialize(param: Tensor) -> None:
    """Put back a convolution weight that a ``packed_session`` swapped out (no-op for any other tensor);
    the session repacks it on the next forward if it changes."""
    conv = _SWAPPED.get(id(param))
    if conv is not None and conv.weight is param:
        _put_back(conv)


@contextmanager
def packed_session(module: nn.Module) -> Iterator[int]:
    """Pack the plain convolutions of ``module`` on first use with one copy of each weight in memory
    (see the module docstring); yields how many convolutions take part (0 without oneDNN)."""
    if not available():
        yield 0
        return
    with _LOCKS_LOCK:
        lock = _SESSION_LOCKS.setdefault(module, threading.RLock())
    with lock:  # reentrant: a nested session on the same module takes no convolution and changes nothing
        taken = [m for m in module.modules() if type(m) is nn.Conv2d]
        for m in taken:
            m.__class__ = PackedConv2d
            _SESSION[m] = None
        try:
            yield len(taken)
        finally:
            for m in taken:
                _put_back(m)
                _SESSION.pop(m, None)
                _CACHE.pop(m, None)
                m.__class__ = nn.Conv2d


def pack_convolutions(module: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` in ``module`` a ``PackedConv2d``; returns how many (0 where
    PyTorch has no oneDNN). Undo with ``unpack_convolutions``."""
    if not available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
            count += 1
    return count


def unpack_convolutions(module: nn.Module) -> int:
    """Plain ``nn.Conv2d`` again, packed copies freed; returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is PackedConv2d:
            m.__class__ = nn.Conv2d
            _CACHE.pop(m, None)
            count += 1
    return count


def packed_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if type(m) is PackedConv2d)
