"""Synthetic captioned scenes: one coloured shape on a plain background, drawn deterministically.

Scene i of seed s is always the same image and caption, e.g. "a small red circle on a blue
background, top left". Combinations listed in ``holdout`` ("green triangle", "yellow on purple") are
never drawn, so a model trained on the rest can be tested on combinations it has not seen.

The demo model never saw the shape and colours in ``NEW_SHAPES`` and ``NEW_COLOURS`` (a five-pointed
star; teal, scarlet): ``scene`` never draws them, and ``scene_from`` draws them only when a dataset asks (the
demo adapters' recipes teach them to the demo model).
"""

from __future__ import annotations

import math
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
# never drawn by ``scene`` (the demo model has not seen them); only where ``scene_from`` is asked for them
# teal is distinct in RGB from the palette, but the demo VAE decodes every colour to its palette (it renders
# teal as blue), so the demo embedding teaches "scarlet", a deeper red that the demo model draws as its red
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"teal": (30, 150, 150), "scarlet": (200, 30, 50)}
NEW_SHAPES = ("star",)
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
ALL_SHAPES = SHAPES + NEW_SHAPES
STAR_INNER = 0.382  # inner / outer radius of a regular five-pointed star (1 / golden ratio squared)
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
    return _finish(rng, colour, shape, background)


def _finish(rng: random.Random, colour: str, shape: str, background: str) -> Scene:
    """Size, position, caption style and jitter, drawn from ``rng`` after the colours and shape."""
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


def scene_from(
    index: int,
    seed: int = 0,
    holdout: set[str] | frozenset = frozenset(),
    shapes: tuple[str, ...] | list[str] = SHAPES,
    colours: tuple[str, ...] | list[str] = tuple(COLOURS),
    backgrounds: tuple[str, ...] | list[str] = tuple(COLOURS),
) -> Scene:
    """Scene ``index`` drawn only from the given shapes, foreground colours and backgrounds (which may
    name ``NEW_SHAPES`` and ``NEW_COLOURS``); captions in the same four styles as ``scene``. A separate
    sequence from ``scene``'s, which stays exactly as the demo model was trained on."""
    _check_choices(shapes, colours, backgrounds, holdout)
    rng = random.Random(seed * 1_000_003 + index + 7_777_777)
    for _ in range(10_000):
        colour, shape, background = rng.choice(list(colours)), rng.choice(list(shapes)), rng.choice(list(backgrounds))
        if background != colour and not _excluded(colour, shape, background, holdout):
            break
    else:
        raise ValueError(f"synthetic scenes: the holdout {sorted(holdout)} excludes every allowed combination")
    return _finish(rng, colour, shape, background)


def _check_choices(shapes, colours, backgrounds, holdout) -> None:
    bad = [f"shape {x!r}" for x in shapes if x not in ALL_SHAPES]
    bad += [f"colour {x!r}" for x in [*colours, *backgrounds] if x not in ALL_COLOURS]
    if bad:
        raise ValueError(
            f"synthetic scenes: unknown {', '.join(bad)}; shapes are {', '.join(ALL_SHAPES)}, "
            f"colours {', '.join(ALL_COLOURS)}"
        )
    pairs = [(c, s, b) for c in colours for s in shapes for b in backgrounds if b != c]
    if not pairs:
        raise ValueError("synthetic scenes: give at least one shape, one colour and a background of another colour")
    if all(_excluded(c, s, b, holdout) for c, s, b in pairs):
        raise ValueError(f"synthetic scenes: the holdout {sorted(holdout)} excludes every allowed combination")


def render(s: Scene, resolution: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene (anti-aliased by drawing at ``supersample`` x and downscaling)."""
    big = resolution * supersample
    image = Image.new("RGB", (big, big), ALL_COLOURS[s.background])
    draw = ImageDraw.Draw(image)
    dx, dy, factor = s.jitter
    cx, cy = (POSITIONS[s.position][0] + dx) * big, (POSITIONS[s.position][1] + dy) * big
    half = SIZES[s.size] * factor * big / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = ALL_COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    elif s.shape == "star":  # five points, the first straight up; outer radius half the width
        points = []
        for k in range(10):
            r = half if k % 2 == 0 else half * STAR_INNER
            angle = math.pi * k / 5
            points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
        draw.polygon(points, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


class SyntheticShapes:
    """A dataset of ``size`` scenes; item i is (image, caption), generated on demand. With ``shapes``,
    ``colours`` or ``backgrounds`` given, scenes come from ``scene_from`` with those choices (the rest
    default to the demo model's), otherwise from ``scene``."""

    def __init__(
        self,
        size: int,
        resolution: int = 64,
        seed: int = 0,
        holdout: list[str] | None = None,
        shapes: list[str] | None = None,
        colours: list[str] | None = None,
        backgrounds: list[str] | None = None,
    ):
        self.size, self.resolution, self.seed = size, resolution, seed
        self.holdout = frozenset(h.lower() for h in (holdout or []))
        self.choices = None
        if shapes or colours or backgrounds:
            self.choices = (tuple(shapes or SHAPES), tuple(colours or COLOURS), tuple(backgrounds or COLOURS))
            _check_choices(*self.choices, self.holdout)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        if self.choices is None:
            s = scene(i, self.seed, self.holdout)
        else:
            s = scene_from(i, self.seed, self.holdout, *self.choices)
        return render(s, self.resolution), s.caption
