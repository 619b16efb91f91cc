"""latentforge: Stable Diffusion in Python, loading the checkpoint files users already have.

Public API: ``load(path, ...) -> Pipeline``; ``families()`` lists the model families.
"""

from latentforge._version import __version__
from latentforge.families import Family, families, get_family
from latentforge.loading import load
from latentforge.pipeline import Pipeline, PromptEmbedding

__all__ = ["Family", "Pipeline", "PromptEmbedding", "__version__", "families", "get_family", "load"]
