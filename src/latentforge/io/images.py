"""Image output: PNG, JPEG or WebP written atomically with their parameters, never over another file.

PNG keeps A1111's ``parameters`` text and latentforge's JSON as text chunks; JPEG and WebP keep the
infotext as A1111 writes it there: the EXIF UserComment, "UNICODE\\0" + UTF-16 (piexif's encoding).
Numbered names are claimed atomically among concurrent processes (``save_numbered``).
"""

from __future__ import annotations

import re
from pathlib import Path
from struct import error as struct_error

from PIL import Image, PngImagePlugin

from latentforge.io.writer import atomic_path, write_numbered

_NUMBERED = re.compile(r"^(\d{5})-")


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}


def save_png(image: Image.Image, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with its ``parameters`` (A1111 infotext) and ``latentforge`` (JSON) text."""
    return save_image(image, path, overwrite=overwrite)


def save_image(image: Image.Image, path: str | Path, *, overwrite: bool = False, quality: int = 95) -> Path:
    """Write ``image`` in the format its suffix names (.png, .jpg/.jpeg, .webp) with its parameters."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image format; use a name ending in {', '.join(FORMATS)}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        _write(image, tmp, fmt, quality)
    return path


def _write(image: Image.Image, path: Path, fmt: str, quality: int) -> None:
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key in ("parameters", "latentforge"):
            if image.info.get(key):
                info.add_text(key, str(image.info[key]))
        image.save(path, format="PNG", pnginfo=info)
    else:
        extra = {"exif": exif_user_comment(str(image.info["parameters"]))} if image.info.get("parameters") else {}
        image.convert("RGB").save(path, format=fmt, quality=quality, **extra)


def save_numbered(image: Image.Image, folder: str | Path, seed: int, suffix: str = ".png", quality: int = 95) -> Path:
    """Write ``image`` as the next A1111-style name ``NNNNN-<seed><suffix>`` in ``folder``. The number
    is claimed atomically (``writer.write_numbered``): processes writing to the same folder at once get
    different numbers and never overwrite each other."""
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image suffix {suffix!r}; use one of {', '.join(FORMATS)}")
    return write_numbered(
        folder,
        lambda tmp: _write(image, tmp, fmt, quality),
        lambda: next_free_names(folder, [seed], suffix)[0].name,
    )


def exif_user_comment(text: str) -> bytes:
    """EXIF bytes holding ``text`` as the UserComment, as A1111 writes JPEG and WebP parameters."""
    import piexif
    import piexif.helper

    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def read_user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment of a JPEG or WebP image (A1111's parameters there), or None."""
    raw = image.info.get("exif")
    if not raw:
        return None
    import piexif
    import piexif.helper

    try:
        comment = piexif.load(raw).get("Exif", {}).get(piexif.ExifIFD.UserComment)
        if isinstance(comment, tuple):  # stored with type BYTE instead of UNDEFINED (e.g. by Pillow)
            comment = bytes(comment)
        return piexif.helper.UserComment.load(comment) if comment else None
    except (ValueError, KeyError, TypeError, struct_error):
        return None


def next_free_names(folder: str | Path, seeds: list[int], suffix: str = ".png") -> list[Path]:
    """A1111-style names ``00012-<seed>.png`` continuing the highest number already in ``folder``."""
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NUMBERED.match(p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return [folder / f"{highest + 1 + i:05d}-{seed}{suffix}" for i, seed in enumerate(seeds)]


def output_paths(
    output: str | Path | None, outdir: str | Path, seeds: list[int], image_format: str | None = None
) -> list[Path]:
    """Where to write: ``output`` itself for one image (``stem-1.png``, ``stem-2.png``... for several),
    otherwise numbered names in ``outdir`` (``image_format``: png, jpeg or webp; default png)."""
    suffix = SUFFIXES.get((image_format or "png").lower())
    if suffix is None:
        raise ValueError(f"unknown image format {image_format!r}; use png, jpeg or webp")
    if output is None:
        return next_free_names(outdir, seeds, suffix)
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise ValueError(f"{output}: output images are PNG, JPEG or WebP files; use a name ending in .png, .jpg, .webp")
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(len(seeds))]
