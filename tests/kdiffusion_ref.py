"""k-diffusion's samplers (Katherine Crowson, MIT) as a test reference.

The package's ``__init__`` imports training dependencies we do not install (jsonmerge, torchvision,
...), so its ``sampling.py`` is loaded by file path, with stand-ins for the three names it imports but
these tests never call (``torchdiffeq.odeint``, ``torchsde``, ``utils.append_dims`` is real).
Install with ``pip install --no-deps k-diffusion`` (the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    path = Path(spec.origin).with_name("sampling.py")
    name = "_kdiffusion_reference"
    if name + ".sampling" in sys.modules:
        return sys.modules[name + ".sampling"]
    package = types.ModuleType(name)
    package.__path__ = []
    utils = types.ModuleType(name + ".utils")
    utils.append_dims = _append_dims
    package.utils = utils
    stubs = {}
    for missing in ("torchdiffeq", "torchsde"):
        if importlib.util.find_spec(missing) is None:
            stub = types.ModuleType(missing)
            stub.odeint = None
            stub.BrownianTree = None
            stubs[missing] = stub
    sys.modules.update({name: package, name + ".utils": utils})
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        module_spec = importlib.util.spec_from_file_location(name + ".sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name + ".sampling"] = module
        module_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module
