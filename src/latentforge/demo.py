"""The small demo model bundled with latentforge (see docs/demo-model.md), and its demo adapters."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_FILE = "demo.safetensors"
DEMO_ADAPTERS = "demo"  # assets/demo/: the demo LoRA, embedding (and ControlNet) trained by recipes/demo_*.toml


def bundled_model_path() -> Path | None:
    """Path of the bundled demo checkpoint, or None when this installation has none."""
    path = Path(str(resources.files("latentforge.assets").joinpath(DEMO_FILE)))
    return path if path.is_file() else None


def bundled_adapters_folder() -> Path | None:
    """The folder of the bundled demo adapters (searched after the user's folders), or None when absent."""
    path = Path(str(resources.files("latentforge.assets").joinpath(DEMO_ADAPTERS)))
    return path if path.is_dir() else None
