"""What the annotator loaders (hed_load.py for HED, midas_load.py for MiDaS) share: finding the file in the
places they search (a missing file named without the folders), and refusing a file that holds tensors the
network does not have."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from latentforge.io.tensorfile import CheckpointError

logger = logging.getLogger(__name__)


def first_found(
    places: Sequence[Path],
    *,
    what: str,
    how_to_get: str,
    error: type[FileNotFoundError],
    found: Callable[[Path], bool] = Path.is_file,
) -> Path:
    """The first of ``places`` that ``found`` accepts; otherwise ``error`` saying ``what`` was not found and
    ``how_to_get`` it, naming no folder: the server passes the message to HTTP clients, to whom the
    machine's paths are neither useful nor theirs to see. The places looked in (in order) are logged at
    INFO for whoever runs it (``latentforge -v``)."""
    for p in places:
        if found(p):
            return p
    logger.info("the %s was not found; looked in: %s", what, ", ".join(map(str, places)) or "no folder")
    raise error(f"the {what} was not found (latentforge -v logs the folders searched). {how_to_get}")


def refuse_extra_tensors(source: str, extra: Sequence[str], *, what: str, layout: str, advice: str) -> None:
    """CheckpointError when ``extra`` (sorted names of the file's tensors that no parameter of ``what`` uses)
    is not empty: the first 8 named, the rest counted, then ``advice``."""
    if extra:
        listed = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise CheckpointError(f"{source} has tensors that are not part of {what} ({layout} layout): {listed}. {advice}")


__all__ = ["first_found", "refuse_extra_tensors"]
