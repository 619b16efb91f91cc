"""How the A1111 ControlNet extension resizes a detected map to a pass's size (its ``high_quality_resize``,
"considering binary, seg, and one-pixel edges"), so that the hints are the extension's:

- a map of 3 to 199 colours (a segmentation or scribble map) is resized nearest, so no new colours appear;
  otherwise area when it shrinks, cubic when it grows;
- a two-colour map with a dark and a light colour (below 16, above 240: an edge map such as canny's) is
  made grey (the channel mean, truncated) and thresholded again with Otsu's method after the resize;
- when most of its white pixels are one-pixel lines (a 3 x 3 opening removes more than half of them),
  the resized lines are first thinned across their direction (a pixel is kept where it is the largest
  of its line along any of the four directions), thresholded with Otsu's method, then made one pixel wide
  again by hit-or-miss thinning (Lvmin Zhang's "High Quality Edge Thinning" kernels: up to 32 rounds of
  eight kernels, each applied in turn) and, when the map grew, pruned of one-pixel spurs.
"""

from __future__ import annotations

import numpy as np

_SQUARE = np.ones((3, 3), np.uint8)
# hit-or-miss kernels: 1 must be set, -1 must be clear, 0 either; each in four rotations (counter-clockwise)
_THIN = ([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNE = ([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])
# a pixel's line through it in each of four directions (horizontal, vertical, both diagonals)
_LINES = (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
    [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
)


def _rotations(raw) -> list[np.ndarray]:
    return [np.rot90(np.array(k, np.int32), turns) for turns in range(4) for k in raw]


THIN_KERNELS = _rotations(_THIN)
PRUNE_KERNELS = _rotations(_PRUNE)


def count_colours(image: np.ndarray) -> int:
    """The number of different pixel values (RGB triplets) of an (H, W, 3) uint8 image."""
    flat = image.reshape(-1, image.shape[-1]).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    ordered = np.sort(packed)
    return int(np.count_nonzero(np.diff(ordered))) + 1 if ordered.size else 0


def line_maxima(grey: np.ndarray) -> np.ndarray:
    """Each pixel kept where no neighbour on its line in some direction is larger (else 0)."""
    import cv2

    out = np.zeros_like(grey)
    for line in _LINES:
        keep = cv2.dilate(grey, np.array(line, np.uint8)) == grey
        out[keep] = grey[keep]
    return out


def _sweep(binary: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clear, kernel after kernel, the pixels each hit-or-miss kernel matches; True when none was."""
    import cv2

    done = True
    for kernel in kernels:
        hits = cv2.morphologyEx(binary, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            binary[hits] = 0
            done = False
    return done


def thin(binary: np.ndarray, prune: bool) -> np.ndarray:
    """One-pixel-wide lines from a 0/255 map (at most 32 rounds), spurs pruned once with ``prune``."""
    out = binary.copy()
    for _ in range(32):
        if _sweep(out, THIN_KERNELS):
            break
    if prune:
        _sweep(out, PRUNE_KERNELS)
    return out


def resize_map(image: np.ndarray, width: int, height: int, colours: int | None = None) -> np.ndarray:
    """A detected map (H, W, 3) uint8 resized to ``width`` x ``height`` as the extension does (module
    docstring). ``colours``: the map's colour count when the caller has it."""
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    colours = count_colours(image) if colours is None else colours
    smaller, bigger = width * height < w * h, width * height > w * h
    binary = colours == 2 and image.min() < 16 and image.max() > 240
    one_pixel = False
    if binary:
        opened = cv2.dilate(cv2.erode(image, _SQUARE), _SQUARE)
        one_pixel = np.count_nonzero(opened < image) * 2 > np.count_nonzero(image > 127)
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
    out = cv2.resize(image, (width, height), interpolation=interpolation)
    if not binary:
        return out
    grey = np.mean(out.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel:
        grey = line_maxima(grey)
    _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if one_pixel:
        grey = thin(grey, prune=bigger)
    return np.repeat(grey[:, :, None], 3, axis=2)
