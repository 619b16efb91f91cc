"""The bundled demo ControlNet (recipes/demo_controlnet.toml): it places the demo model's shape where the
control image's white disc is, at blob centres its training never drew (the recipe's holdout_centres).

Judged independently of the scene generator: the shape is test_demo's largest blob that differs from the
border colour, and its centroid (mean pixel position) must lie within TOLERANCE pixels of the disc's centre.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import latentforge
from latentforge.demo import bundled_model_path
from test_demo import _largest_blob

RESOLUTION = 64
TOLERANCE = 5.0  # pixels of 64 (the small shapes are about 19 px wide)
# centres (fractions) held out of training (recipes/demo_controlnet.toml: no training centre within 0.05)
HELD_OUT = [(0.35, 0.4), (0.62, 0.66), (0.5, 0.3), (0.4, 0.65), (0.66, 0.45)]
PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a purple background",
    "an orange triangle on a green background",
    "a white circle on a red background",
    "a blue square on a yellow background",
]


def controlnet_path() -> Path:
    return Path(str(resources.files("latentforge.assets").joinpath("demo/controlnet/demo_blob_controlnet.safetensors")))


def disc(centre: tuple[float, float], radius: float = 0.15) -> Image.Image:
    big = RESOLUTION * 4
    image = Image.new("RGB", (big, big))
    cx, cy, r = centre[0] * big, centre[1] * big, radius * big
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255))
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)


def shape_centroid(image: Image.Image) -> tuple[float, float] | None:
    """(x, y) pixel centroid of the largest blob unlike the border's median colour, or None if there is none."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    border = np.concatenate(
        [arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)]
    )
    blob = _largest_blob(np.linalg.norm(arr - np.median(border, axis=0), axis=-1) > 60)
    if blob.sum() < 12:
        return None
    ys, xs = np.nonzero(blob)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel centres


def test_centroid_analysis_on_drawn_discs():
    """The analysis itself, on images whose centre is known by construction."""
    for cx, cy in HELD_OUT:
        got = shape_centroid(Image.composite(Image.new("RGB", (64, 64), (40, 80, 220)), Image.new("RGB", (64, 64),
                                             (240, 210, 40)), disc((cx, cy)).convert("L")))  # fmt: skip
        assert got is not None and np.hypot(got[0] - cx * 64, got[1] - cy * 64) < 0.5


def test_training_scenes_put_the_disc_on_the_shape_and_avoid_held_out_centres():
    """The recipe's data (train/controlnet.blob_scene) judged by the same analysis: the control disc's
    centroid is the drawn shape's, and no training centre comes near a held-out one."""
    from latentforge.train.controlnet import blob_scene

    for i in range(60):
        image, hint, _caption, centre = blob_scene(i, 1, RESOLUTION, frozenset(), tuple(HELD_OUT), 0.05)
        shape = shape_centroid(image)
        arr = np.asarray(hint.convert("L")).astype(np.float64)
        ys, xs = np.indices(arr.shape)
        disc_centre = ((xs + 0.5) * arr).sum() / arr.sum(), ((ys + 0.5) * arr).sum() / arr.sum()
        if max(arr[[0, -1]].max(), arr[:, [0, -1]].max()) < 8:  # a disc cut by the border has another centroid
            assert np.hypot(disc_centre[0] - centre[0] * 64, disc_centre[1] - centre[1] * 64) < 0.3
        assert shape is not None and np.hypot(shape[0] - disc_centre[0], shape[1] - disc_centre[1]) < 1.5, i
        assert min(np.hypot(centre[0] - x, centre[1] - y) for x, y in HELD_OUT) >= 0.05


@pytest.fixture(scope="module")
def demo():
    assert bundled_model_path() is not None and controlnet_path().is_file()
    return latentforge.load(bundled_model_path())


def test_demo_controlnet_is_bundled_and_small():
    path = controlnet_path()
    assert path.is_file() and path.stat().st_size <= 4 * 2**20


CASES = [(c, p) for i, c in enumerate(HELD_OUT) for p in (PROMPTS[i], PROMPTS[(i + 2) % len(PROMPTS)])]


def _placed(demo, controlled: bool) -> tuple[int, str]:
    """How many of CASES put the shape's centroid within TOLERANCE of the disc, and a report."""
    rows, right = [], 0
    for i, (centre, prompt) in enumerate(CASES):
        unit = {"model": str(controlnet_path()), "image": disc(centre), "module": "none", "resize_mode": 0}
        image = demo.txt2img(prompt, seed=2000 + i, steps=12, control=[unit] if controlled else []).images[0]
        got = shape_centroid(image)
        want = (centre[0] * RESOLUTION, centre[1] * RESOLUTION)
        dist = float(np.hypot(got[0] - want[0], got[1] - want[1])) if got else float("inf")
        right += dist <= TOLERANCE
        rows.append(f"{'ok ' if dist <= TOLERANCE else 'BAD'} {prompt!r} disc at {want} -> {got} ({dist:.1f} px)")
    return right, "\n".join(rows)


def test_demo_controlnet_places_the_shape_at_held_out_blob_centres(demo):
    right, report = _placed(demo, True)
    print(report)
    assert right >= 0.8 * len(CASES), f"{right}/{len(CASES)} within {TOLERANCE} px\n{report}"
    # the same seeds without the ControlNet: the held-out centres are off the demo model's own positions
    plain, report = _placed(demo, False)
    print(report)
    assert plain <= 0.3 * len(CASES), f"{plain}/{len(CASES)} placed without the ControlNet\n{report}"
