"""Detected maps resized as the A1111 ControlNet extension's ``high_quality_resize`` does
(pipelines/control_resize.py): few-colour maps keep their colours, two-colour maps stay two-colour, and
one-pixel edge maps (canny's) stay one-pixel edges after the resize, where a plain resize blurs them into
grey bands two or three pixels wide. (Compared with the extension's own function in a scratch harness on
180 maps of each kind, up and down: all equal; the properties below hold without it.)"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from latentforge.pipelines.control import fit
from latentforge.pipelines.control_resize import count_colours, resize_map


def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 4)


def _edges(h: int = 72, w: int = 88) -> np.ndarray:
    grey = (_blobs(h, w, 1) * 255).astype(np.uint8)
    grey = cv2.normalize(grey, None, 0, 255, cv2.NORM_MINMAX)
    return np.repeat(cv2.Canny(grey, 30, 90)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("size", [(150, 130), (40, 31)])
def test_few_colour_maps_resize_nearest(size):
    palette = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250], [128, 128, 128]], np.uint8)
    y, x = np.mgrid[0:70, 0:90]
    labels = ((x // 13 + y // 11) + (_blobs(70, 90, 2) > 0.5)) % 5
    seg = palette[labels]
    assert count_colours(seg) == 5
    out = resize_map(seg, *size)
    assert out.shape == (size[1], size[0], 3)
    assert np.array_equal(out, cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST))


def test_photos_resize_area_down_cubic_up():
    photo = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 256, (60, 80, 3)).astype(np.uint8), (0, 0), 1.5)
    assert count_colours(photo) >= 200
    assert np.array_equal(resize_map(photo, 40, 30), cv2.resize(photo, (40, 30), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_map(photo, 120, 90), cv2.resize(photo, (120, 90), interpolation=cv2.INTER_CUBIC))
    assert resize_map(photo, 80, 60) is photo


def test_thick_two_colour_maps_stay_two_colour():
    blobs = np.repeat(((_blobs(64, 64, 4) > 0.5) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    out = resize_map(blobs, 100, 90)
    assert set(np.unique(out)) == {0, 255}
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    plain = cv2.resize(blobs, (100, 90), interpolation=cv2.INTER_CUBIC)[..., 0] > 127
    assert np.mean((out[..., 0] > 127) != plain) < 0.01  # the same shapes, only the edges' grey decided


@pytest.mark.parametrize("scale", [1.5, 2.0, 0.75])
def test_one_pixel_edges_stay_one_pixel_wide(scale):
    edges = _edges()
    h, w = edges.shape[:2]
    size = (round(w * scale), round(h * scale))
    out = resize_map(edges, *size)[..., 0]
    assert set(np.unique(out)) <= {0, 255}
    white = out > 127
    blocks = white[:-1, :-1] & white[1:, :-1] & white[:-1, 1:] & white[1:, 1:]
    assert blocks.sum() <= 0.02 * white.sum()  # next to no 2 x 2 white blocks: lines one pixel wide
    plain = cv2.resize(edges, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)[..., 0] > 64
    assert white.sum() < 0.8 * plain.sum()  # a plain resize makes them wider
    near = cv2.dilate(plain.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert white[~near].sum() == 0  # and every line is where the edges were
    # as many line pixels as the edges scaled: thinned, not lost
    assert 0.5 * scale * (edges[..., 0] > 0).sum() < white.sum() < 1.5 * scale * (edges[..., 0] > 0).sum()


def test_fit_uses_it_in_every_resize_mode():
    edges = _edges(64, 64)
    for mode in (0, 1, 2):
        out = fit(edges, 96, 80, mode)
        assert out.shape == (80, 96, 3) and set(np.unique(out)) <= {0, 255}
