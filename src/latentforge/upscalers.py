"""Image upscaler models (the ESRGAN family) by name, and upscaling PIL images with them.

Files are found by name (the file's stem) in A1111's ``models/ESRGAN`` (and ``models/RealESRGAN``),
ComfyUI's ``models/upscale_models``, or folders the user names; a path to a file works as well.
``upscale_image`` follows A1111's upscaler: the network runs (at most three times) until the image is
at least the requested size, then a Lanczos resize gives the exact size (a 4x model asked for 2x runs
once and is resized down). The networks are in ``models/esrgan.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.models.esrgan import ImageUpscaler, load_upscaler

SUFFIXES = (".pth", ".safetensors", ".pt")
# the folders A1111 and ComfyUI keep upscaler models in, relative to their models/ folder
FOLDER_NAMES = ("ESRGAN", "RealESRGAN", "upscale_models")

# A1111's names of the Real-ESRGAN models it downloads (into models/RealESRGAN) -> their file stems, so
# that A1111's infotexts ("Hires upscaler: R-ESRGAN 4x+") find the same files
A1111_NAMES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}


class UpscalerNotFound(ValueError):
    """No upscaler file of that name; the message lists the folders searched and close names."""


def search_dirs(extra: Iterable[str | Path] = (), near: str | Path | None = None) -> list[Path]:
    """The upscaler folders that exist: ``extra`` first (each must exist), then ``models/ESRGAN``,
    ``models/RealESRGAN`` and ``models/upscale_models`` under the current folder and beside the folder
    holding ``near`` (a checkpoint in A1111's ``models/Stable-diffusion`` or ComfyUI's
    ``models/checkpoints``)."""
    dirs = []
    for d in extra:
        d = Path(d)
        if not d.is_dir():
            raise UpscalerNotFound(f"upscaler folder {d} does not exist or is not a folder")
        dirs.append(d)
    roots = [Path("models")]
    if near is not None:
        roots.append(Path(near).resolve().parent.parent)
    for root in roots:
        for name in FOLDER_NAMES:
            d = root / name
            if d.is_dir() and d.resolve() not in {x.resolve() for x in dirs}:
                dirs.append(d)
    return dirs


def available(dirs: Iterable[str | Path]) -> dict[str, Path]:
    """Upscaler files in ``dirs`` (and their subfolders) by name; the first folder wins a name clash."""
    found: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.suffix.lower() in SUFFIXES and p.is_file():
                found.setdefault(p.stem, p)
    return found


def find(name: str | Path, dirs: Iterable[str | Path]) -> Path:
    """The file of an upscaler given by path or by name (file stem, any letter case, or A1111's name of
    a Real-ESRGAN model) in ``dirs``."""
    path = Path(name)
    if path.suffix.lower() in SUFFIXES:
        if path.is_file():
            return path
        if len(path.parts) > 1:
            raise UpscalerNotFound(f"upscaler file {path} does not exist")
    dirs = list(dirs)
    files = available(dirs)
    wanted = {str(name).strip().lower(), path.stem.lower() if path.suffix.lower() in SUFFIXES else ""}
    wanted |= {stem.lower() for a1111, stem in A1111_NAMES.items() if a1111.lower() in wanted}
    for stem, p in files.items():
        if stem.lower() in wanted:
            return p
    where = ", ".join(str(d) for d in dirs) or "no upscaler folder (give one with --upscaler-dir)"
    close = difflib.get_close_matches(str(name), list(files), n=3, cutoff=0.4)
    hint = f"; close matches: {', '.join(close)}" if close else (f"; available: {', '.join(files)}" if files else "")
    raise UpscalerNotFound(f"no upscaler model {str(name)!r} (.pth/.safetensors) in {where}{hint}")


def load(name: str | Path, dirs: Iterable[str | Path] = (), device: str | torch.device = "cpu") -> ImageUpscaler:
    """Find and load an upscaler by name or path (see ``find``)."""
    from latentforge.device import parse_device

    return load_upscaler(find(name, dirs), device=parse_device(device))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _to_image(x: torch.Tensor) -> Image.Image:
    arr = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def run(image: Image.Image, upscaler: ImageUpscaler) -> Image.Image:
    """One pass of the network at its native scale (RGB, 8 bits, rounded)."""
    return _to_image(upscaler(_to_tensor(image)))


def _passes(size: tuple[int, int], net_scale: float, target: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes after each pass of a network of factor ``net_scale`` from ``size`` toward ``target``
    (width, height): passes until the image is at least the target, three at most (as A1111)."""
    w, h = size
    sizes: list[tuple[int, int]] = []
    while len(sizes) < 3 and (w < target[0] or h < target[1]):
        w, h = round(w * net_scale), round(h * net_scale)
        sizes.append((w, h))
    return sizes


def upscale_to(image: Image.Image, upscaler: ImageUpscaler, size: tuple[int, int]) -> Image.Image:
    """``image`` at ``size`` (width, height): the network's passes (``_passes``), then Lanczos to the
    exact size."""
    w, h = size
    for _ in _passes(image.size, upscaler.scale, (w, h)):
        image = run(image, upscaler)
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    return image


def upscale_sizes(size: tuple[int, int], net_scale: float, scale: float) -> list[tuple[int, int]]:
    """The sizes ``upscale_image`` makes from an image of ``size`` (width, height): after each of the
    network's passes (``_passes``), then the target itself, which Lanczos gives when the passes missed it.
    No pixel is made."""
    if not 0 < scale <= 16:  # also NaN
        raise ValueError(f"upscale factor must be above 0 and at most 16, got {scale}")
    w, h = size
    if scale == net_scale:
        return [(round(w * scale), round(h * scale))]
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    sizes = _passes(size, net_scale, target)
    return sizes if sizes and sizes[-1] == target else [*sizes, target]


def check_upscale(
    size: tuple[int, int], upscaler: ImageUpscaler, scale: float | None, max_pixels: int, flag: str
) -> None:
    """ValueError, before any pixel is made, when upscaling an image of ``size`` by ``scale`` (None: the
    network's own factor) would make an image of more than ``max_pixels`` pixels, the network's passes
    included; the message names the sizes and ``flag``, the way to raise the limit."""
    scale = upscaler.scale if scale is None else scale
    sizes = upscale_sizes(size, upscaler.scale, scale)
    w, h = max(sizes, key=lambda s: s[0] * s[1])
    if w * h <= max_pixels:
        return
    final = sizes[-1]
    made = f"{final[0]}x{final[1]}" if (w, h) == final else f"{final[0]}x{final[1]}, through {w}x{h} from the network"
    raise ValueError(
        f"upscaling {size[0]}x{size[1]} by {scale:g} with {upscaler.name} (x{upscaler.scale:g}) makes {made}: "
        f"{w * h} pixels, over the limit of {max_pixels} ({flag}); choose a smaller --scale or a smaller image, "
        f"or raise the limit with {flag}"
    )


def upscale_image(
    image: Image.Image, upscaler: ImageUpscaler | str | Path, scale: float | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Upscale by ``scale`` (None: the network's own factor), e.g. ``upscale_image(im, "4x-UltraSharp.pth", 2)``.
    ``upscaler`` is a loaded ``ImageUpscaler``, a file path, or a name in the usual folders (``search_dirs``).
    Images over ``max_pixels`` (default the upscaler's ``max_pixels``), at any pass or at the end, are
    refused before any pixel is made (``check_upscale``)."""
    if not isinstance(upscaler, ImageUpscaler):
        upscaler = load(upscaler, search_dirs())
    if max_pixels is not None:  # the network's own check of each pass too
        upscaler = dataclasses.replace(upscaler, max_pixels=max_pixels)
    check_upscale(image.size, upscaler, scale, upscaler.max_pixels, "max_pixels")
    scale = upscaler.scale if scale is None else scale
    if scale == upscaler.scale:
        return run(image, upscaler)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return upscale_to(image, upscaler, size)
