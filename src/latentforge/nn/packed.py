"""Convolution and linear weights packed once into oneDNN's blocked layout (issue 16, "weights prepared
once").

PyTorch's CPU convolution hands oneDNN the weight in the plain OIHW layout, and oneDNN reorders it into
its blocked layout on every call (issue 16 traced all 98 SD1.5 UNet convolutions repacked every step);
its bf16 linear layers likewise go through a GEMM that packs the weight matrix on every call.
``pack_weights`` gives each ``nn.Conv2d`` a forward that calls the oneDNN convolution
(``torch.ops.mkldnn._convolution_pointwise``, the op inductor's freezing pass emits) with a weight
reordered once by ``torch.ops.mkldnn._reorder_convolution_weight`` for the input's shape, and each
``nn.Linear`` (bf16, where oneDNN has bf16) a forward that calls ``torch.ops.mkldnn._linear_pointwise``
with a weight reordered once by ``torch.ops.mkldnn._reorder_linear_weight`` (the row count of the first
input is only a hint: any input works with it). A weight is reordered again only when it changes (its
version counter: LoRA merges through the patcher copy in place), is replaced (another dtype or device),
or, for a convolution, the input shape changes. The result is the same convolution or product (tested
against ``nn.Conv2d`` and ``nn.Linear``); the cost is a second copy of the packed weights in memory.
A convolution with circular padding (tiling, ``nn/circular.py``) gets its input padded as ``nn.Conv2d``
pads it and runs with padding 0 (Winograd's: ``winograd.conv3x3(wraps=True)``). Other inputs (GPU,
gradients, mixed dtypes, string padding, other padding modes, fp32 linears, which PyTorch runs through
MKL already) use the module's own forward. Subclasses of ``nn.Conv2d`` and ``nn.Linear`` are left alone (the
UNet's GEGLU projection is one: its fused forward reads the two halves of the plain weight).

``packed_session(module)`` is the default during a full-size CPU generation (``pipelines/generate.py``,
with ``repeated=True``: smaller maps by Winograd too, see ``nn/winograd.py``) and costs no memory for
oneDNN's layers (Winograd's filters are extra): inside it each layer, once packed, swaps its plain weight
out for an empty placeholder (the packed copy is the only one), repacks from the packed copy
(``to_dense``) when a convolution's input shape changes, and on exit every plain weight is put back bit
for bit and the modules are plain ``nn.Conv2d`` / ``nn.Linear`` again. Code that must read a weight
inside a session calls ``materialize`` first (the patcher does); reading a swapped-out weight otherwise
fails with a shape error, never silently. ``pack_weights`` (``--pack-weights``) keeps both copies across
generations instead.

``packed_session(module, keep=True)`` (what generations open on the UNet and the VAE) leaves the layers it
swapped out that way when it ends: between sessions the packed copy stays the only copy (the same memory
as the plain weights), so the next session starts with the weights packed instead of paying the reorders
and the exit's copies back (0.5-0.7 s and 0.55 s per SD1.5 image, ``benchmarks/image_overhead.py``).
Such a dormant layer turns back into a plain ``nn.Conv2d`` / ``nn.Linear`` with its plain weight, bit for
bit, as soon as anything outside a session uses it: reading ``layer.weight``, calling it, ``state_dict``,
``load_state_dict``, ``.to()`` and the other ``_apply`` methods, pickling and ``copy.deepcopy``.
Iterating ``parameters()`` sees the empty placeholder: callers that need every weight (training, sizes)
call ``settle(module)`` first, or ``numel(module)`` for the size.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from latentforge import allocator
from latentforge.nn import circular, fused, native_avx2, winograd
from latentforge.nn.blocks import GroupNorm32

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# layers inside a packed_session: None, or once their plain weight is swapped out for the packed copy,
# that weight's (shape, strides) (a channels-last weight comes back channels-last)
_SESSION: weakref.WeakKeyDictionary[nn.Module, tuple | None] = weakref.WeakKeyDictionary()
# convolutions run by Winograd (nn/winograd.py): layer -> (weight key, transformed filters, made in a
# session); their plain weight stays in place (it cannot be recovered bit for bit from the transform).
# Filters made in a session are dropped when it ends or by ``shed`` (the VAE's call): kept, they would
# sit through the next memory peak (SD1.5's UNet: 0.96 GB, 1 s to make per generation). Those of
# ``pack_weights``' layers outside sessions stay while the weight is unchanged (``forget`` drops them).
_WINO: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_WINO_LOCK = threading.Lock()
# layers inside a session -> whether it was opened with repeated=True
_REPEATED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
# bytes of plain weights swapped out since a session last handed free heap pages back (allocator.release)
_FREED = {"bytes": 0}
# handed back during a call too once this much is free (the first call swaps out a whole UNet's weights)
RELEASE_BYTES = 128 << 20
# weight parameter id -> its layer, for materialize(param) (weak: a dormant layer's model may be unloaded)
_SWAPPED: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
# one session at a time per module (generations on the same UNet from two threads take turns)
_SESSION_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()
# layers a session with keep=True left swapped out (the packed copy the only one) until the next session
# adopts them or something outside a session wakes them (``_wake``)
_DORMANT: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_DORMANT_LOCK = threading.RLock()


def available() -> bool:
    """True when this PyTorch has the oneDNN ops (CPU builds with mkldnn)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _linear_available() -> bool:
    """oneDNN's linear op with bf16 in hardware (the only linears packed)."""
    return fused.available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def _half_packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs this 16-bit dtype on this CPU: without AVX-512 (or AVX-NE-CONVERT) its weight
    reorders refuse bf16 and fp16, which PyTorch's own convolution still runs."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    fn = getattr(torch.ops.mkldnn, check, None)
    return bool(fn is not None and fn())


def _plain_path(layer: nn.Module, x: Tensor) -> bool:
    """Inputs the packed forward leaves to the module's own: other devices, autograd, mixed dtypes, 16-bit
    dtypes the CPU's oneDNN cannot run."""
    w, b = layer.weight, layer.bias
    return (
        x.device.type != "cpu"
        or w.device.type != "cpu"
        or x.dtype != w.dtype
        or (b is not None and b.dtype != w.dtype)
        or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        or (x.dtype in (torch.bfloat16, torch.float16) and not _half_packable(x.dtype))
    )


def _packed_weight(layer: nn.Module, x: Tensor, pack, repack_for_shape: bool, shape: tuple | None = None) -> Tensor:
    """The layer's packed weight for input ``x``: cached; packed again when the plain weight changed (or,
    with ``repack_for_shape``, the input shape, or ``shape``: what else the packing depends on with it);
    inside a session the plain weight is then swapped out."""
    shape = tuple(x.shape) if shape is None else shape
    cache = _CACHE.get(layer)
    if _SESSION.get(layer) is not None:  # the packed copy is the only one: repack from it if needed
        if repack_for_shape and cache["shape"] != shape:
            cache = _store(layer, pack(cache["weight"].to_dense(), x), shape, cache["key"])
        return cache["weight"]
    _WINO.pop(layer, None)  # one prepared form at a time
    w = layer.weight
    key = (id(w), w._version, w.dtype)
    if cache is None or cache["key"] != key or (repack_for_shape and cache["shape"] != shape):
        # one packed copy per layer: for the latest weight (and input shape)
        cache = _store(layer, pack(w.detach(), x), shape, key)
    if layer in _SESSION:
        _swap_out(layer)
    return cache["weight"]


def _store(layer: nn.Module, packed: Tensor, shape: tuple, key: tuple) -> dict:
    cache = _CACHE[layer] = {"key": key, "shape": shape, "weight": packed}
    return cache


class _Wakes:
    """What wakes a dormant layer (see the module docstring): every way of reading its weights outside a
    session. Each wakes the layer (its class becomes the plain one) and then runs the plain method."""

    def __getattr__(self, name: str):
        if name == "weight" and _wake(self):
            return getattr(self, name)
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        if _wake(self):
            return self._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if _wake(self):
            return self._save_to_state_dict(destination, prefix, keep_vars)
        return super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        if _wake(self):
            return self._load_from_state_dict(*args, **kwargs)
        return super()._load_from_state_dict(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        if _wake(self):
            return self.__reduce_ex__(protocol)
        return super().__reduce_ex__(protocol)


class PackedConv2d(_Wakes, nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, state dict and pickling) whose CPU forward uses a weight
    packed once. Made by ``pack_weights`` or a session changing the module's class; the packed copy lives
    in a module-level weak table, so copies and saved modules never carry it."""

    def forward(self, x: Tensor) -> Tensor:
        if _wake(self):  # dormant and called outside a session: a plain convolution again
            return self.forward(x)
        wraps = self.padding_mode == circular.CIRCULAR  # tiling (nn/circular.py)
        if (
            _plain_path(self, x)
            or x.dim() != 4
            or isinstance(self.padding, str)
            or not (self.padding_mode == "zeros" or wraps)
        ):
            _put_back(self)
            return super().forward(x)
        if winograd.usable(self, x, repeated=_REPEATED.get(self, False)):
            if x.dtype == torch.float32:  # filters transformed per call: nothing cached (nn/winograd.py)
                _put_back(self)
                _CACHE.pop(self, None)
                return winograd.conv3x3_fp32(x, self.weight, self.bias, wraps=wraps)
            u = _winograd_filters(self)
            return winograd.conv3x3(x, u, self.bias, self.out_channels, wraps=wraps)
        padding = list(self.padding)
        if wraps:  # padded here as nn.Conv2d pads, then convolved with padding 0
            x, padding = circular.pad(self, x), [0, 0]
        args = (padding, list(self.stride), list(self.dilation), self.groups)

        def pack(weight: Tensor, x: Tensor) -> Tensor:
            return torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape))

        # oneDNN packs for the whole problem: the input's shape and the padding
        weight = _packed_weight(self, x, pack, repack_for_shape=True, shape=(*x.shape, *padding))
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, "none", [], "")


class PackedLinear(_Wakes, nn.Linear):
    """An ``nn.Linear`` whose bf16 CPU forward uses a weight packed once by oneDNN (as ``PackedConv2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        if _wake(self):
            return self.forward(x)
        if (
            _plain_path(self, x)
            or x.dtype != torch.bfloat16
            or x.dim() < 2
            or x.numel() == 0
            or not _linear_available()
        ):
            _put_back(self)
            return super().forward(x)

        def pack(weight: Tensor, x: Tensor) -> Tensor:
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), x.numel() // x.shape[-1])

        weight = _packed_weight(self, x, pack, repack_for_shape=False)
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


def norm_silu_conv(norm: nn.Module, conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(norm(x, silu=True))``: a ResBlock's GroupNorm, SiLU and 3x3 convolution. Where the convolution
    runs by fp32 Winograd with the AVX2 kernels (``nn.native_avx2``), the GroupNorm becomes a per-image,
    per-channel affine map (its statistics one read of ``x``) applied with the SiLU as the input transform
    reads the rows: the normalised map, the size of ``x`` (268 MB at the SD VAE's last level at 512 px, the
    decode's memory peak), is never written nor read back. Elsewhere the plain calls."""
    if _norm_fusable(norm, conv, x):
        _put_back(conv)
        _CACHE.pop(conv, None)
        prologue = native_avx2.group_norm_affine(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return winograd.conv3x3_fp32(x, conv.weight, conv.bias, prologue=prologue)
    return conv(norm(x, silu=True))


def _norm_fusable(norm: nn.Module, conv: nn.Module, x: Tensor) -> bool:
    """A plain GroupNorm32 and a packed convolution inside a session, neither hooked (adapters, offloading),
    no autograd, and the convolution's own forward would take fp32 Winograd with the AVX2 transforms."""
    modules = torch.nn.modules.module
    return (
        type(conv) is PackedConv2d
        and type(norm) is GroupNorm32
        and conv in _SESSION
        and not (norm._forward_hooks or norm._forward_pre_hooks or conv._forward_hooks or conv._forward_pre_hooks)
        and not (modules._global_forward_hooks or modules._global_forward_pre_hooks)
        and x.dim() == 4
        and x.dtype == torch.float32
        and norm.num_channels == x.shape[1]
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not _plain_path(conv, x)
        and not (torch.is_grad_enabled() and any(p.requires_grad for p in norm.parameters()))
        and winograd.usable(conv, x, repeated=_REPEATED.get(conv, False))
        and native_avx2.winograd_usable(x, conv.out_channels)
    )


def _winograd_filters(conv: nn.Conv2d) -> Tensor:
    """The convolution's Winograd-transformed filters, made again when the weight changed; the plain weight
    is put back first if a session swapped it out, and oneDNN's packed copy is dropped."""
    _put_back(conv)
    _CACHE.pop(conv, None)
    w = conv.weight
    key = (id(w), w._version, w.dtype)
    entry = _WINO.get(conv)
    if entry is None or entry[0] != key:
        entry = (key, winograd.transform(w), conv in _SESSION)
        with _WINO_LOCK:
            _WINO[conv] = entry
    return entry[1]


def _drop_session_filters(layers) -> None:
    with _WINO_LOCK:
        for m in [m for m in layers if m in _WINO and _WINO[m][2]]:
            del _WINO[m]


def shed() -> None:
    """Drop the Winograd filters that open sessions made, in every module (made again on their next use):
    the VAE calls it before it runs, a generation's memory peak, while the UNet's session is still open."""
    with _WINO_LOCK:
        layers = list(_WINO.keys())
    _drop_session_filters(layers)
    winograd.release()  # the fp32 path's workspace too (U, V and M: up to 240 MB for SD1.5's UNet)


def _release_freed() -> None:
    """The heap pages that swapped-out plain weights left free go back to the system; without it they
    stay resident through the session (0.2-0.35 GB for SD1.5's UNet)."""
    _FREED["bytes"] = 0
    allocator.release()


def _after_call(module: nn.Module, args, output) -> None:
    """A session's forward hook: what the call swapped out and did not hand back yet, handed back."""
    if _FREED["bytes"]:
        _release_freed()


_PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}
_PLAIN = {packed: plain for plain, packed in _PACKED.items()}


def _swap_out(layer: nn.Module) -> None:
    w = layer.weight
    layout = (w.shape, w.stride())
    freed = w.numel() * w.element_size()
    with torch.inference_mode(False):  # a normal (not inference) tensor, as the parameter's data was
        w.data = torch.empty(0, dtype=w.dtype, device=w.device)
    _SESSION[layer] = layout
    _SWAPPED[id(w)] = layer
    _FREED["bytes"] += freed
    if _FREED["bytes"] >= RELEASE_BYTES:
        _release_freed()


def _put_back(layer: nn.Module) -> None:
    """The plain weight back from the packed copy (exact: a reorder), the packed copy kept; nothing
    when the weight is not swapped out."""
    layout = _SESSION.get(layer)
    if layout is None:
        return
    with torch.inference_mode(False):
        dense = _CACHE[layer]["weight"].to_dense()
        if (dense.shape, dense.stride()) != layout or dense.device != layer.weight.device:  # channels-last
            dense = torch.empty_strided(*layout, dtype=layer.weight.dtype, device=layer.weight.device).copy_(dense)
        layer.weight.data = dense
    _SESSION[layer] = None
    _SWAPPED.pop(id(layer.weight), None)


def materialize(param: Tensor) -> None:
    """Put back a weight that a ``packed_session`` swapped out (no-op for any other tensor); the session
    repacks it on the next forward if it changes."""
    layer = _SWAPPED.get(id(param))
    if layer is not None and not _wake(layer) and layer.weight is param:
        _put_back(layer)


def _wake(layer: nn.Module) -> bool:
    """A dormant layer (left packed by a kept session) made a plain layer with its plain weight again;
    False (nothing done) for any other."""
    if layer not in _DORMANT:
        return False
    with _DORMANT_LOCK:
        if layer not in _DORMANT:  # another thread woke it, or a session adopted it
            return False
        _DORMANT.discard(layer)
        _settle(layer)
    return True


def _settle(layer: nn.Module) -> None:
    """The end of a layer's part in sessions: plain weight back, packed copy dropped, plain class. The
    dropped copies' heap pages are handed back every ``RELEASE_BYTES``, as the swap-outs' are: settling a
    whole UNet otherwise held both copies of up to 0.3 GB of weights at once (the packed ones made on a
    heap that a sampler's steps had kept, ``allocator.reusing("steps")``)."""
    _put_back(layer)
    _SESSION.pop(layer, None)
    if _CACHE.pop(layer, None) is not None:
        w = layer.weight
        _FREED["bytes"] += w.numel() * w.element_size()
        if _FREED["bytes"] >= RELEASE_BYTES:
            _release_freed()
    _REPEATED.pop(layer, None)
    layer.__class__ = _PLAIN[type(layer)]


def settle(module: nn.Module) -> int:
    """Wake every dormant layer of ``module`` (plain weights back, packed copies freed): before code that
    iterates its parameters (training); returns how many."""
    return sum(_wake(m) for m in list(module.modules()))


def numel(module: nn.Module, nbytes: bool = False) -> int:
    """The number of ``module``'s parameter values (``nbytes``: their bytes), a swapped-out weight counted
    at its plain size (its packed copy holds as much)."""
    total = 0
    for m in module.modules():
        layout = _SESSION.get(m)
        for name, p in m.named_parameters(recurse=False):
            count = math.prod(layout[0]) if layout is not None and name == "weight" else p.numel()
            total += count * (p.element_size() if nbytes else 1)
    return total


def _packable(module: nn.Module) -> list[nn.Module]:
    """The plain ``nn.Conv2d`` and ``nn.Linear`` layers of ``module`` (not subclasses, not packed ones)."""
    return [m for m in module.modules() if type(m) in _PACKED]


@contextmanager
def packed_session(module: nn.Module, repeated: bool = False, keep: bool = False) -> Iterator[int]:
    """Pack the plain convolution and linear layers of ``module`` on first use with one copy of each
    weight in memory (see the module docstring); yields how many layers take part (0 without oneDNN).
    Winograd filters made in the session are dropped when it ends. ``repeated``: the module runs many
    times in this session (a sampler's steps), so smaller maps run by Winograd too
    (``winograd.MIN_PIXELS_REPEATED``). ``keep``: the layers swapped out stay so after the session (dormant,
    see the module docstring), for the next session to start with."""
    if not available():
        yield 0
        return
    with _LOCKS_LOCK:
        lock = _SESSION_LOCKS.setdefault(module, threading.RLock())
    with lock:  # reentrant: a nested session on the same module takes no layer and changes nothing
        with _DORMANT_LOCK:  # adopted: no longer woken by reads, as any layer inside a session
            dormant = [m for m in module.modules() if m in _DORMANT]
            for m in dormant:
                _DORMANT.discard(m)
        taken = _packable(module)
        for m in taken:
            m.__class__ = _PACKED[type(m)]
            _SESSION[m] = None
        taken += dormant
        for m in taken:
            _REPEATED[m] = repeated
        hook = module.register_forward_hook(_after_call) if taken else None
        try:
            yield len(taken)
        finally:
            if hook is not None:
                hook.remove()
            for m in taken:
                if keep and _SESSION.get(m) is not None:  # swapped out: stays so until woken or adopted
                    _REPEATED.pop(m, None)
                    with _DORMANT_LOCK:
                        _DORMANT.add(m)
                else:
                    _settle(m)
            _drop_session_filters(taken)
            winograd.release()
            if taken:
                allocator.release()  # the packed copies' pages


def pack_weights(module: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` / ``nn.Linear`` in ``module`` a ``PackedConv2d`` / ``PackedLinear``;
    returns how many (0 where PyTorch has no oneDNN). Undo with ``unpack_weights``."""
    if not available():
        return 0
    settle(module)
    taken = _packable(module)
    for m in taken:
        m.__class__ = _PACKED[type(m)]
    return len(taken)


def unpack_weights(module: nn.Module) -> int:
    """Plain ``nn.Conv2d`` / ``nn.Linear`` again, packed copies freed; returns how many."""
    count = settle(module)
    for m in module.modules():
        if type(m) in _PLAIN:
            m.__class__ = _PLAIN[type(m)]
            _CACHE.pop(m, None)
            _WINO.pop(m, None)
            count += 1
    winograd.release()
    return count


def forget(module: nn.Module) -> None:
    """Drop the Winograd filters kept for the convolutions of ``module`` (they are made again on use)."""
    with _WINO_LOCK:
        for m in module.modules():
            _WINO.pop(m, None)


def packed_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if type(m) in _PLAIN)
