"""The Hires. fix options of ``latentforge txt2img`` (cli_generate.py adds them and reads them back)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the hires pass's own settings: (flag, A1111 field, what)
OWN = [
    ("--hires-prompt", "hr_prompt", "prompt"),
    ("--hires-negative-prompt", "hr_negative_prompt", "negative prompt"),
    ("--hires-sampler", "hr_sampler_name", "sampler"),
    ("--hires-schedule", "hr_scheduler", "schedule"),
]
# every option that sets the hires pass: (flag, A1111 field)
SETTINGS = [
    ("--hires-upscaler", "hr_upscaler"),
    ("--hires-steps", "hr_second_pass_steps"),
    *[(flag, dest) for flag, dest, _ in OWN],
    ("--hires-checkpoint", "hr_checkpoint_name"),
]


def add_hires_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hires",
        dest="hr_scale",
        type=float,
        default=None,
        help="A1111's Hires. fix: upscale by this factor (e.g. 2) and run a second img2img pass at that size",
    )
    p.add_argument(
        "--hires-upscaler",
        dest="hr_upscaler",
        default=None,
        help="Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
        "Latent (nearest), Latent (nearest-exact), None (as Lanczos), Lanczos, Nearest, or an ESRGAN-family model "
        "by path or name",
    )
    p.add_argument(
        "--upscaler-dir",
        type=Path,
        action="append",
        help="folder of upscaler models for --hires-upscaler (repeatable; models/ESRGAN, models/RealESRGAN "
        "and models/upscale_models here and beside the checkpoint's folder are searched too)",
    )
    p.add_argument("--hires-steps", dest="hr_second_pass_steps", type=int, help="steps of the second pass")
    for flag, dest, what in OWN:
        p.add_argument(flag, dest=dest, default=None, help=f"the second pass's own {what} (default: the same)")
    p.add_argument(
        "--hires-checkpoint",
        dest="hr_checkpoint_name",
        type=Path,
        default=None,
        help="A1111's Hires checkpoint: another model (a file or diffusers folder) runs the second pass",
    )


def hires_options(args: argparse.Namespace, has_hires: bool) -> dict:
    """The request fields the hires options give (``has_hires``: the request has a hires pass already, from
    --from); a hires setting without a hires pass is an error naming the flags."""
    options = {}
    for _, dest in SETTINGS:
        value = getattr(args, dest, None)
        if value is not None:
            options[dest] = str(value) if isinstance(value, Path) else value
    if getattr(args, "hr_scale", None) is not None:
        options.update(enable_hr=True, hr_scale=args.hr_scale)
    elif not has_hires:  # the second pass's options mean nothing without one
        given = [flag for flag, dest in SETTINGS if getattr(args, dest, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) the hires pass; add --hires FACTOR (e.g. --hires 2)")
    return options
