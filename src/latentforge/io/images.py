"""PNG output: images written atomically with their parameters as PNG text, never over another file;
numbered names claimed atomically among concurrent processes."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from latentforge.io.writer import atomic_path, write_numbered

_NUMBERED = re.compile(r"^(\d{5})-")


def _png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key in ("parameters", "latentforge"):
        if image.info.get(key):
            info.add_text(key, str(image.info[key]))
    return info


def save_png(image: Image.Image, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with its ``parameters`` (A1111 infotext) and ``latentforge`` (JSON) text."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(image))
    return path


def save_numbered(image: Image.Image, folder: str | Path, seed: int) -> Path:
    """Write ``image`` as the next A1111-style name ``NNNNN-<seed>.png`` in ``folder``. The number is
    claimed atomically (``writer.write_numbered``): processes writing to the same folder at once get
    different numbers and never overwrite each other."""
    return write_numbered(
        folder,
        lambda tmp: image.save(tmp, format="PNG", pnginfo=_png_info(image)),
        lambda: next_free_names(folder, [seed])[0].name,
    )


def next_free_names(folder: str | Path, seeds: list[int]) -> list[Path]:
    """A1111-style names ``00012-<seed>.png`` continuing the highest number already in ``folder``."""
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NUMBERED.match(p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return [folder / f"{highest + 1 + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def output_paths(output: str | Path | None, outdir: str | Path, seeds: list[int]) -> list[Path]:
    """Where to write: ``output`` itself for one image (``stem-1.png``, ``stem-2.png``... for several),
    otherwise numbered names in ``outdir``."""
    if output is None:
        return next_free_names(outdir, seeds)
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"{output}: output images are PNG files; use a name ending in .png")
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(len(seeds))]
