"""What the annotator loaders (hed_load.py for HED, midas_load.py for MiDaS) share: finding the file in the
places they search, and refusing a file that holds tensors the network does not have."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from latentforge.io.tensorfile import CheckpointError


def first_found(
    places: Sequence[Path],
    *,
    what: str,
    how_to_get: str,
    error: type[FileNotFoundError],
    found: Callable[[Path], bool] = Path.is_file,
) -> Path:
    """The first of ``places`` that ``found`` accepts; otherwise ``error`` naming ``what`` was not found,
    every place looked in (in order), then ``how_to_get``."""
    for p in places:
        if found(p):
            return p
    looked = "\n".join(f"    {p}" for p in places) or "    (nowhere: no model path or folder given)"
    raise error(f"the {what} was not found; looked in:\n{looked}\n{how_to_get}")


def refuse_extra_tensors(source: str, extra: Sequence[str], *, what: str, layout: str, advice: str) -> None:
    """CheckpointError when ``extra`` (sorted names of the file's tensors that no parameter of ``what`` uses)
    is not empty: the first 8 named, the rest counted, then ``advice``."""
    if extra:
        listed = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise CheckpointError(f"{source} has tensors that are not part of {what} ({layout} layout): {listed}. {advice}")


__all__ = ["first_found", "refuse_extra_tensors"]
