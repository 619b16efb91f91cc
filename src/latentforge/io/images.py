"""Image output: PNG, JPEG or WebP written atomically with their parameters, never over another file.

PNG keeps A1111's ``parameters`` text and latentforge's JSON as text chunks; JPEG and WebP keep the
infotext as A1111 writes it there: the EXIF UserComment, "UNICODE\\0" + UTF-16 (piexif's encoding),
written with piexif and read back by a small bounded EXIF reader of our own (``user_comment_from_exif``).
Numbered names are claimed atomically among concurrent processes (``save_numbered``).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

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
    return user_comment_from_exif(raw) if isinstance(raw, bytes) and raw else None


# The EXIF reader: A1111's infotext is the UserComment (tag 0x9286) of the Exif sub-IFD (pointer tag
# 0x8769 in IFD0), "UNICODE\0" + UTF-16 big-endian (piexif.helper.UserComment, also on little-endian
# files), or "ASCII\0\0\0" / "JIS\0\0\0\0\0" + text. Only those two tags are read, from the bytes
# given: every offset and count is checked against their length before it is used, an IFD may hold
# at most _MAX_IFD_ENTRIES entries and a comment at most MAX_USER_COMMENT_BYTES, so a hostile EXIF
# block costs time and memory in proportion to its size, never more; bytes are never taken for a
# file name (piexif.load opens a path when its input has no TIFF header, and allocates whatever
# count an entry declares). Anything malformed reads as "no comment".
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_MAX_IFD_ENTRIES = 1024  # a camera's Exif IFD has under 100; A1111 writes one entry in each
MAX_USER_COMMENT_BYTES = 2**20  # as PIL's limit on a PNG text chunk (ImageFile's MAX_TEXT_CHUNK)
_COMMENT_ENCODINGS = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}


def _ifd_value(data: memoryview, order: str, ifd: int, tag: int, types: tuple[int, ...]) -> bytes | None:
    """The value bytes of ``tag`` in the IFD at offset ``ifd`` of a TIFF block, when its type is one of
    ``types`` and it lies inside ``data``; else None."""
    if not 8 <= ifd <= len(data) - 2:
        return None
    (count,) = struct.unpack_from(order + "H", data, ifd)
    if count > _MAX_IFD_ENTRIES or ifd + 2 + 12 * count > len(data):
        return None
    for i in range(count):
        entry = ifd + 2 + 12 * i
        found, kind, n = struct.unpack_from(order + "HHI", data, entry)
        if found != tag:
            continue
        if kind not in types:
            return None
        size = _TYPE_SIZES[kind] * n  # a Python int: a hostile count is only compared, never allocated
        if size <= 4:
            return bytes(data[entry + 8 : entry + 8 + size])
        (offset,) = struct.unpack_from(order + "I", data, entry + 8)
        if size > MAX_USER_COMMENT_BYTES or offset + size > len(data):
            return None
        return bytes(data[offset : offset + size])
    return None


def user_comment_from_exif(raw: bytes) -> str | None:
    """The UserComment text of an EXIF block (with or without JPEG's ``Exif\\0\\0`` prefix), or None
    when it has none or is malformed. Bounded by the block's size; reads no file (see above)."""
    data = memoryview(raw)
    if raw[:6] == b"Exif\0\0":
        data = data[6:]
    head = bytes(data[:4])
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(head)
    if order is None or len(data) < 8:
        return None
    (ifd0,) = struct.unpack_from(order + "I", data, 4)
    pointer = _ifd_value(data, order, ifd0, _EXIF_IFD, (4, 13))  # LONG or IFD, one of them
    if pointer is None or len(pointer) != 4:
        return None
    (exif_ifd,) = struct.unpack(order + "I", pointer)
    comment = _ifd_value(data, order, exif_ifd, _USER_COMMENT, (1, 2, 7))  # BYTE, ASCII or UNDEFINED
    if not comment:
        return None
    encoding = _COMMENT_ENCODINGS.get(comment[:8])
    if encoding is None:  # A1111 (images.read_info_from_image): no known prefix, the bytes as UTF-8
        return comment.decode("utf-8", errors="ignore").strip("\0") or None  # (an UNDEFINED prefix: NULs)
    return comment[8:].decode(encoding, errors="replace")


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
    if image_format is not None and FORMATS[output.suffix.lower()] != FORMATS.get(suffix):
        raise ValueError(
            f"{output} names its format by its ending, and --format {image_format} asks for another; "
            f"end the name in {suffix}, or leave out --format (it is for numbered outputs)"
        )
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(len(seeds))]
