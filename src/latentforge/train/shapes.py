"""Synthetic captioned scenes: one coloured shape on a plain background, drawn deterministically.

Scene i of seed s is always the same image and caption, e.g. "a small red circle on a blue
background, top left". Combinations listed in ``holdout`` ("green triangle", "yellow on purple") are
never drawn, so a model trained on the rest can be tested on combinations it has not seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "in the center": (0.5, 0.5),
}
SIZES = {"small": 0.30, "large": 0.55}  # shape width as a fraction of the image


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str
    caption: str
    jitter: tuple[float, float, float] = (0.0, 0.0, 1.0)  # dx, dy (fractions of the image), size factor


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _excluded(colour: str, shape: str, background: str, holdout: set[str]) -> bool:
    return f"{colour} {shape}" in holdout or f"{colour} on {background}" in holdout


def scene(index: int, seed: int = 0, holdout: set[str] | frozenset = frozenset()) -> Scene:
    rng = random.Random(seed * 1_000_003 + index)
    while True:
        colour, background = rng.sample(list(COLOURS), 2)
        shape = rng.choice(SHAPES)
        if not _excluded(colour, shape, background, holdout):
            break
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS)) if size == "small" else "in the center"
    style = rng.random()
    on = f"on {article(background)} {background} background"
    if style < 0.4:
        caption = f"a {size} {colour} {shape} {on}, {position}"
    elif style < 0.7:
        caption = f"{article(colour)} {colour} {shape} {on}"
    elif style < 0.85:
        caption = f"a {size} {colour} {shape} {on}"
    else:
        caption = f"{article(colour)} {colour} {shape}, {position}, {background} background"
    jitter = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.85, 1.15))
    return Scene(colour, shape, background, size, position, caption, jitter)


def render(s: Scene, resolution: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene (anti-aliased by drawing at ``supersample`` x and downscaling)."""
    big = resolution * supersample
    image = Image.new("RGB", (big, big), COLOURS[s.background])
    draw = ImageDraw.Draw(image)
    dx, dy, factor = s.jitter
    cx, cy = (POSITIONS[s.position][0] + dx) * big, (POSITIONS[s.position][1] + dy) * big
    half = SIZES[s.size] * factor * big / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


class SyntheticShapes:
    """A dataset of ``size`` scenes; item i is (image, caption), generated on demand."""

    def __init__(self, size: int, resolution: int = 64, seed: int = 0, holdout: list[str] | None = None):
        self.size, self.resolution, self.seed = size, resolution, seed
        self.holdout = frozenset(h.lower() for h in (holdout or []))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        s = scene(i, self.seed, self.holdout)
        return render(s, self.resolution), s.caption
