"""Generation: the request, the one generate loop, and what each task adds."""

from latentforge.pipelines.generate import GenerationResult, Interrupted, Progress, generate
from latentforge.pipelines.request import GenerationRequest, RequestError

__all__ = ["GenerationRequest", "GenerationResult", "Interrupted", "Progress", "RequestError", "generate"]
