"""Circular padding for seamless, tileable images (A1111's "Tiling").

With tiling on, A1111 (``modules/sd_hijack.py``, ``apply_circular``) sets ``padding_mode="circular"`` on every
``nn.Conv2d`` of the model while it generates: a convolution near one edge then reads the pixels across
the opposite edge, so the image is a torus and its copies laid side by side meet without a seam. A
convolution commutes with circular shifts of its input exactly when it pads circularly, so the UNet's
estimates, and with them the sampled latent and its decoded image, have no edges. Convolutions with
padding 0 read no padding and are unaffected; the VAE encoder's downsamplers pad right and bottom with
zeros themselves (``F.pad``) and then convolve with padding 0, unchanged by A1111 and in diffusers.

``circular_padding(on, *modules)`` is the switch: the convolutions of the modules given (a generation
passes its UNet and VAE, not the ControlNets or text encoders, as in A1111, where ControlNets are other
modules) pad circularly until it exits, also by an exception; then each has its padding mode of before.
Only convolutions that pad are switched (the others compute the same either way, without the copy that
PyTorch's circular padding makes). Like a request's LoRAs, the switch changes the shared modules:
generations on the same networks must not overlap (the server's one worker runs them in turn).
``is_circular`` tells code that splits work into tiles (the VAE's tiled decode, ``nn/tiling.py``) that the
tiles must wrap around. ``pad`` pads a convolution's input as ``nn.Conv2d`` pads it, for the fast
convolution paths that run without the module's own forward (``nn/packed.py``, ``nn/winograd.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIRCULAR = "circular"


class CircularSwitch:
    """The convolutions made circular so far and their padding modes before (``circular_padding``)."""

    def __init__(self, on: bool):
        self.on = bool(on)
        self._before: dict[nn.Conv2d, str] = {}

    def add(self, *modules: nn.Module | None) -> None:
        """Make the padding convolutions of ``modules`` circular too (nothing when the switch is off), e.g.
        a refiner's networks loaded while the generation runs."""
        if not self.on:
            return
        for module in modules:
            if module is None:
                continue
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d) and layer not in self._before and _pads(layer):
                    self._before[layer] = layer.padding_mode
                    layer.padding_mode = CIRCULAR

    def restore(self) -> None:
        for layer, mode in self._before.items():
            layer.padding_mode = mode
        self._before.clear()


def _pads(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


@contextmanager
def circular_padding(on: bool, *modules: nn.Module | None) -> Iterator[CircularSwitch]:
    """With ``on``, the padding convolutions of ``modules`` pad circularly inside the block (A1111's
    Tiling); afterwards, also after an exception, each has its padding mode of before. Off, nothing
    changes. Yields the switch, whose ``add`` takes in networks loaded inside the block."""
    switch = CircularSwitch(on)
    try:
        switch.add(*modules)
        yield switch
    finally:
        switch.restore()


def is_circular(module: nn.Module) -> bool:
    """Whether any convolution of ``module`` pads circularly (its tiles must then wrap around)."""
    return any(isinstance(m, nn.Conv2d) and m.padding_mode == CIRCULAR for m in module.modules())


def pad(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) padded circularly by the convolution's padding, as ``nn.Conv2d`` does before it
    convolves with padding 0; a channels-last input gives a channels-last result."""
    out = F.pad(x, conv._reversed_padding_repeated_twice, mode=CIRCULAR)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
