"""Textual-inversion embeddings stored in images, as A1111 writes them (its ``.png``/``.webp`` embedding cards).

A1111 keeps an embedding in an image two ways, and reads the first it finds:

- a PNG text chunk ``sd-ti-embedding``: base64 of the embedding's JSON, each tensor written as
  ``{"TORCHTENSOR": nested lists}``;
- the pixels (for images whose text chunks were lost, and WebP): the zlib-compressed JSON's low nibbles
  in a block of pixels left of the picture and its high nibbles in a block right of it, each block's
  bytes in its pixels' low 4 bits (row by row, R, G, B) XOR a fixed pseudo-random stream (the LCG
  x <- 1664525 x + 1013904223 mod 2^32 from 0, taking x mod 255, low 4 bits); a black column separates
  each block from the picture, the pixels' high 4 bits are decoration. After cropping the black border,
  the first and last columns whose low nibbles are all 0 are the separators.

The JSON holds what an A1111 ``.pt`` embedding holds (``string_to_param``, ``name``, ``step``, ...); its
``name``, when present, is the embedding's name, whatever the file is called. Images are read within
``MAX_PIXELS`` and the JSON within ``MAX_JSON_BYTES``, so a hostile file fails in bounded time and memory.
Tensors come back as float64 numpy arrays; the caller makes them tensors.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path

import numpy as np

TEXT_KEY = "sd-ti-embedding"
IMAGE_SUFFIXES = (".png", ".webp")
MAX_PIXELS = 4 * 1024 * 1024  # A1111's cards: a picture and two data blocks, well under a million pixels
MAX_JSON_BYTES = 64 * 1024 * 1024
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32


class EmbeddingImageError(ValueError):
    """An image holds embedding data that cannot be read (``found``: the data is there, damaged), or the file
    is not a readable image at all (``found`` False); the message names the file and the fault."""

    def __init__(self, message: str, found: bool = True):
        super().__init__(message)
        self.found = found


def lcg_stream(count: int) -> np.ndarray:
    """The first ``count`` values of A1111's ``lcg()`` stream (x mod 255 for x <- a x + c mod 2^32, from
    x = 0) as uint8, computed a block at a time, each block one affine jump from the previous."""
    block = 4096
    first = np.empty(block, dtype=np.uint64)
    x = 0
    for i in range(block):
        x = (_LCG_A * x + _LCG_C) % _LCG_M
        first[i] = x
    jump_a, jump_c = 1, 0  # x_{n+block} = jump_a x_n + jump_c
    for _ in range(block):
        jump_a, jump_c = (_LCG_A * jump_a) % _LCG_M, (_LCG_A * jump_c + _LCG_C) % _LCG_M
    blocks = [first]
    total = block
    while total < count:
        # both factors are below 2^32 and jump_c too: the products fit in uint64 before the modulo
        blocks.append((np.uint64(jump_a) * blocks[-1] + np.uint64(jump_c)) % np.uint64(_LCG_M))
        total += block
    values = np.concatenate(blocks)[:count]
    return (values % np.uint64(255)).astype(np.uint8)


def _tensors(obj: dict):
    """``json.loads`` object hook: A1111's ``{"TORCHTENSOR": lists}`` as a float64 array."""
    if "TORCHTENSOR" in obj:
        try:
            array = np.asarray(obj["TORCHTENSOR"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("a TORCHTENSOR value is not a rectangular array of numbers") from None
        return array
    return obj


def _parse(text: bytes, path: Path, where: str) -> dict:
    try:
        data = json.loads(text, object_hook=_tensors)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise EmbeddingImageError(f"{path}: the embedding data in {where} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EmbeddingImageError(f"{path}: the embedding data in {where} is not a JSON object")
    return data


def _crop_black(rgb: np.ndarray) -> np.ndarray:
    """The bounding box of the pixels whose three channels are all above 0 (A1111's ``crop_black``)."""
    lit = (rgb > 0).all(axis=2)
    cols, rows = lit.any(axis=0), lit.any(axis=1)
    if not cols.any():
        return rgb[:0, :0]
    c0, c1 = cols.argmax(), len(cols) - cols[::-1].argmax()
    r0, r1 = rows.argmax(), len(rows) - rows[::-1].argmax()
    return rgb[r0:r1, c0:c1]


def _from_pixels(rgb: np.ndarray, path: Path) -> dict | None:
    low = _crop_black(rgb) & 0x0F
    separators = np.flatnonzero(low.sum(axis=(0, 2), dtype=np.int64) == 0)
    if len(separators) < 2:
        return None
    lower, upper = low[:, : separators.min()], low[:, separators.max() + 1 :]
    if lower.shape != upper.shape or lower.size < 2:
        return None
    head = lcg_stream(2) & 0x0F  # a zlib header (deflate, check bits) first, before the whole stream is made
    cmf, flg = ((upper.reshape(-1)[:2] ^ head) << 4) | (lower.reshape(-1)[:2] ^ head)
    if cmf & 0x0F != 8 or (int(cmf) * 256 + int(flg)) % 31:
        return None
    stream = (lcg_stream(lower.size) & 0x0F).reshape(lower.shape)
    packed = (((upper ^ stream) << 4) | (lower ^ stream)).astype(np.uint8).tobytes()
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(packed, MAX_JSON_BYTES)
    except zlib.error:
        return None  # separators by chance in an ordinary picture: no embedding there
    if inflate.unconsumed_tail:
        raise EmbeddingImageError(
            f"{path}: the embedding data in the pixels inflates to more than {MAX_JSON_BYTES >> 20} MiB; "
            "an embedding is far smaller, so the file is damaged or hostile"
        )
    return _parse(text, path, "the pixels")


def read_embedding_image(path: str | Path) -> dict | None:
    """The embedding data of an image file (the text chunk, else the pixels), or None when it holds none
    (a preview or any other picture). ``EmbeddingImageError`` for a file that is not a readable image or
    whose embedding data is damaged."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path, formats=("PNG", "WEBP")) as image:  # no other decoder runs on such files
            if image.width * image.height > MAX_PIXELS:
                raise EmbeddingImageError(
                    f"{path}: {image.width}x{image.height} pixels is more than an embedding image holds "
                    f"(at most {MAX_PIXELS} pixels are read)",
                    found=False,
                )
            text = getattr(image, "text", None) or {}  # PNG text chunks; WebP has none
            if TEXT_KEY in text:
                try:
                    raw = base64.b64decode(text[TEXT_KEY], validate=False)
                except (binascii.Error, ValueError) as e:
                    raise EmbeddingImageError(f"{path}: the {TEXT_KEY} text chunk is not base64 ({e})") from None
                return _parse(raw, path, f"the {TEXT_KEY} text chunk")
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except EmbeddingImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # any decoder fault of a hostile file is this file's error
        raise EmbeddingImageError(f"{path}: not a readable PNG or WebP image ({e})", found=False) from None
    return _from_pixels(rgb, path)
