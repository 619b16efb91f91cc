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
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


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
            return super().forward(x)
        key = (id(w), w._version, w.dtype, tuple(x.shape))
        cache = _CACHE.get(self)
        if cache is None or cache["key"] != key:
            # one packed copy per convolution: for the latest weight and input shape
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            packed = torch.ops.mkldnn._reorder_convolution_weight(w.detach(), *args, list(x.shape))
            cache = _CACHE[self] = {"key": key, "weight": packed, "args": args}
        padding, stride, dilation, groups = cache["args"]
        return torch.ops.mkldnn._convolution_pointwise(
            x, cache["weight"], b, padding, stride, dilation, groups, "none", [], ""
        )


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
