"""Offloading for small GPUs: weights stay in CPU memory and move to the GPU only while they compute.

``model`` offload keeps one network (text encoder, UNet or VAE) on the GPU at a time: the UNet stays
there for all the steps of a generation, so it costs one transfer per network per image.
``sequential`` offload moves each top-level block of each network in and out around its forward, so
only one block's weights are on the GPU at any time: the least memory, many transfers.
Inputs are moved to the compute device by the same hooks, so callers need not know where weights are.
"""

from __future__ import annotations

import torch
from torch import nn


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _called_blocks(module: nn.Module):
    """The submodules that are called one after another: children, looking inside containers that are
    never called themselves (ModuleList, modules without a forward of their own)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList) or type(child).forward is nn.Module.forward:
            yield from _called_blocks(child)
        else:
            yield child


class Offloader:
    """Moves networks (or their blocks) to the compute device around their forward. Its hooks are
    registered with the pipeline's ``ModelPatcher`` under the source "offload", next to any adapter's."""

    SOURCE = "offload"

    def __init__(self, device: torch.device, storage: torch.device, patcher):
        self.device, self.storage = device, storage
        self.patcher = patcher
        self.resident: nn.Module | None = None
        self.moves = 0

    def _bring(self, module: nn.Module) -> None:
        if self.resident is module:
            return
        if self.resident is not None:
            self.resident.to(self.storage)
        module.to(self.device)
        self.resident = module
        self.moves += 1

    def attach_model(self, module: nn.Module) -> None:
        """Bring the whole ``module`` before any of its called parts runs (the VAE is used through
        encode/decode, which call its children, not its forward)."""

        def pre(mod, args, kwargs):
            self._bring(module)
            return _to(args, self.device), _to(kwargs, self.device)

        for part in (module, *module.children()):
            self.patcher.add_hook(self.SOURCE, part, pre=pre)

    def attach_sequential(self, module: nn.Module) -> None:
        def pre(mod, args, kwargs):
            mod.to(self.device)
            self.moves += 1
            return _to(args, self.device), _to(kwargs, self.device)

        def post(mod, args, output):
            mod.to(self.storage)
            return output

        for block in _called_blocks(module):
            self.patcher.add_hook(self.SOURCE, block, pre=pre, post=post)
        # the parent's own forward also receives inputs on the wrong device
        self.patcher.add_hook(self.SOURCE, module, pre=lambda m, a, k: (_to(a, self.device), _to(k, self.device)))

    def remove(self) -> None:
        """Remove the hooks; the weights stay in CPU memory."""
        self.patcher.remove(self.SOURCE)


def make_offloader(
    networks: list[nn.Module], patcher, device: str | torch.device = "cuda", *, sequential: bool = False
) -> Offloader:
    """Keep ``networks``' weights in CPU memory and compute on ``device``; see the module docstring."""
    device = torch.device(device)
    storage = torch.device("cpu")
    offloader = Offloader(device, storage, patcher)
    for module in networks:
        module.to(storage)
        if sequential:
            offloader.attach_sequential(module)
        else:
            offloader.attach_model(module)
    return offloader
