"""The small demo model bundled with latentforge (see docs/demo-model.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_FILE = "demo.safetensors"


def bundled_model_path() -> Path | None:
    """Path of the bundled demo checkpoint, or None when this installation has none."""
    path = Path(str(resources.files("latentforge.assets").joinpath(DEMO_FILE)))
    return path if path.is_file() else None
