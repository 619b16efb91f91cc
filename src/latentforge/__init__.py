"""latentforge: Stable Diffusion in Python, loading the checkpoint files users already have.

Public API: ``load(path, ...) -> Pipeline``; ``families()`` lists the model families.
"""

from latentforge.families import Family, families, get_family
from latentforge.loading import load
from latentforge.pipeline import Pipeline, PromptEmbedding

__version__ = "0.1.0"
__all__ = ["Family", "Pipeline", "PromptEmbedding", "__version__", "families", "get_family", "load"]
