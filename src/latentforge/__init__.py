"""latentforge: Stable Diffusion in Python, loading the checkpoint files users already have.

Public API: ``load(path, ...) -> Pipeline``; ``families()`` lists the model families; ``save_image(image,
path)`` writes a result as PNG, JPEG or WebP with its parameters.
"""

# Before anything imports torch: idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE,
# unless the user set a policy), so a generation does not collapse when another process wants the
# cores. OpenMP reads the variable once, when torch loads: importing latentforge after torch cannot
# change it (see latentforge.threads and the README's "Performance" section).
from latentforge.threads import prefer_passive_waiting

prefer_passive_waiting()

from latentforge._version import __version__  # noqa: E402
from latentforge.families import Family, families, get_family  # noqa: E402
from latentforge.io.images import save_image  # noqa: E402
from latentforge.loading import load  # noqa: E402
from latentforge.pipeline import Pipeline, PromptEmbedding  # noqa: E402

__all__ = ["Family", "Pipeline", "PromptEmbedding", "__version__", "families", "get_family", "load", "save_image"]
