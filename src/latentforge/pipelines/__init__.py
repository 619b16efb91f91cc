"""Generation: the request and its option groups, plans of passes, the one generate loop, and the tasks
that build passes (hires.py, refiner.py, upscale_x4.py; images.py for image input and output)."""

from latentforge.pipelines.generate import GenerationResult, Interrupted, Progress, generate
from latentforge.pipelines.numerics import NonFiniteError
from latentforge.pipelines.options import GenerationOptions
from latentforge.pipelines.request import (
    ControlUnit,
    GenerationRequest,
    HiresOptions,
    InpaintOptions,
    NetworkRef,
    RefinerOptions,
    RequestError,
    X4Options,
)

__all__ = [
    "ControlUnit",
    "GenerationOptions",
    "GenerationRequest",
    "GenerationResult",
    "HiresOptions",
    "InpaintOptions",
    "Interrupted",
    "NetworkRef",
    "NonFiniteError",
    "Progress",
    "RefinerOptions",
    "RequestError",
    "X4Options",
    "generate",
]
