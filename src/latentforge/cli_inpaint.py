"""The inpainting and outpainting options of ``latentforge img2img`` (cli_generate.py adds them)."""

from __future__ import annotations

import argparse
from pathlib import Path

FILL_NAMES = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}
# inpainting options: (flags, field of InpaintOptions, argparse keywords)
INPAINT_OPTIONS = [
    (("--mask",), "mask", dict(type=Path, help="inpaint: mask image, white = repaint (an RGBA image's alpha counts)")),
    (("--mask-blur",), "mask_blur", dict(type=float, help="inpaint: blur the mask by this many pixels (default 4)")),
    (
        ("--inpaint-fill",),
        "inpainting_fill",
        dict(
            choices=list(FILL_NAMES),
            help="inpaint: masked content: original (default), fill, latent-noise, latent-nothing",
        ),
    ),
    (
        ("--only-masked",),
        "inpaint_full_res",
        dict(action="store_true", help="inpaint only the masked region, at full size"),
    ),
    (
        ("--padding",),
        "inpaint_full_res_padding",
        dict(type=int, help="with --only-masked: pixels around the mask (32)"),
    ),
    (("--invert-mask",), "inpainting_mask_invert", dict(action="store_true", help="repaint what is NOT masked")),
]


def add_inpaint_options(p: argparse.ArgumentParser) -> None:
    for flags, dest, kwargs in INPAINT_OPTIONS:
        p.add_argument(*flags, dest=f"inpaint_{dest}", default=None, **kwargs)
    p.add_argument(
        "--mask-weight",
        dest="inpainting_mask_weight",
        type=float,
        help="inpainting models: how much of the init image (with --mask: of the masked area) they see cleared, "
        "0 to 1 (A1111's conditional mask weight; default 1)",
    )
    p.add_argument(
        "--outpaint",
        metavar="PIXELS",
        help="extend the canvas and paint the new area: one number for every side, or LEFT,TOP,RIGHT,BOTTOM "
        "(multiples of 8; masked content defaults to fill)",
    )


def inpaint_group(args: argparse.Namespace, current: dict | None) -> dict | None:
    """The inpaint group from --mask and friends, over the group of a --from record."""
    given = {}
    for _, dest, _ in INPAINT_OPTIONS:
        value = getattr(args, f"inpaint_{dest}", None)
        if value is not None and value is not False:
            given[dest] = FILL_NAMES[value] if dest == "inpainting_fill" else value
    if "mask" in given:
        given["mask"] = str(given["mask"])
    outpaint = getattr(args, "outpaint", None)
    if outpaint:
        try:
            sides = [int(v) for v in outpaint.split(",")]
        except ValueError:
            sides = []
        if len(sides) not in (1, 4):
            raise ValueError(f"--outpaint takes one number or LEFT,TOP,RIGHT,BOTTOM, got {outpaint!r}")
        sides = sides * 4 if len(sides) == 1 else sides
        given.update(zip(("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom"), sides))
        given.setdefault("inpainting_fill", 0)
    if not given:
        return current
    return {**(current or {}), **given}
