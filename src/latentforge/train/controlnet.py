"""ControlNet training (Zhang, Rao and Agrawala 2023) with the recipe of diffusers'
``examples/controlnet/train_controlnet.py``: the ControlNet starts as a copy of the base UNet's encoder
(time embedding, input blocks, middle block); its zero convolutions and the hint encoder's last
convolution start at zero, so at step 0 the controlled UNet equals the plain one. The UNet, VAE and text
encoders stay frozen; the loss is the UNet's usual eps/v loss (``train.diffusion.diffusion_loss``) with the
ControlNet's residuals added; control images enter in [0, 1]; captions are dropped with
``model.caption_dropout`` (the example's ``proportion_empty_prompts``).

Data: image / control image / caption triples. A folder (``data.path``) holds the images with same-named
``.txt`` captions; the control images carry the images' names (any image suffix) in
``controlnet.conditioning_path`` (kohya's ``conditioning_data_dir``), by default its ``conditioning/``
subfolder. The synthetic kind draws the demo scenes (``train/shapes.py``) at arbitrary centres with a
white disc on black at the shape's centroid and size as the control image.

The file is the original layout (``control_model.`` + the names of ``models/controlnet.py``), as the
ControlNet releases, A1111's extension and ComfyUI read it, with latentforge metadata.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from latentforge.adapters.controlnet import PREFIX
from latentforge.io.writer import write_safetensors
from latentforge.models.controlnet import ControlNet, ControlNetConfig
from latentforge.models.unet import ControlResiduals
from latentforge.train.config import ConfigError, TrainConfig, config_to_dict
from latentforge.train.data import IMAGE_SUFFIXES, DataError, Problem, fit_square
from latentforge.train.shapes import COLOURS, SHAPES, SIZES, Scene, article, render

log = logging.getLogger("latentforge")
ORIGINAL_HINT_WIDTHS = (16, 32, 96, 256)  # the original hint encoder (3 stride-2 steps: an 8x VAE)
_COPIED = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


def hint_widths(cfg: TrainConfig, downscale: int) -> tuple[int, ...]:
    """The hint encoder's widths: one stride-2 step per factor 2 of the VAE's downscale, so the hint
    reaches latent size; the original's widths cut to that length unless ``controlnet.hint_widths`` says."""
    steps = int(math.log2(downscale)) if downscale >= 1 else -1
    if steps < 0 or 2**steps != downscale:
        raise ConfigError(f"the VAE's downscale {downscale} is not a power of 2; a ControlNet hint cannot reach it")
    given = cfg.controlnet.hint_widths
    if given:
        if not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in given):
            raise ConfigError(f"config key 'controlnet.hint_widths' must be whole numbers 1..4096, got {given!r}")
        if len(given) != steps + 1:
            raise ConfigError(
                f"config key 'controlnet.hint_widths' needs {steps + 1} widths for this model's {downscale}x VAE "
                f"(one more than its {steps} halvings), got {len(given)}"
            )
        return tuple(given)
    if steps + 1 > len(ORIGINAL_HINT_WIDTHS):
        raise ConfigError(f"set controlnet.hint_widths: {steps + 1} widths for the {downscale}x VAE")
    return ORIGINAL_HINT_WIDTHS[: steps + 1]


def init_controlnet(unet, widths: tuple[int, ...], seed: int = 0) -> ControlNet:
    """diffusers' ``ControlNetModel.from_unet``: the encoder copied from ``unet``, zero convolutions and the
    hint encoder's last convolution zero, the other hint convolutions PyTorch's default (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNet(ControlNetConfig(unet.config, hint_widths=tuple(widths)))
    source = unet.state_dict()
    copied = {k: source[k].detach().clone() for k in net.state_dict() if k.startswith(_COPIED)}
    net.load_state_dict(copied, strict=False)
    last = net.input_hint_block[len(net.input_hint_block) - 1]
    with torch.no_grad():
        for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], last]:
            conv.weight.zero_()
            conv.bias.zero_()
    param = next(unet.parameters())
    return net.to(device=param.device, dtype=torch.float32)


# --- data -----------------------------------------------------------------------------------------


def _disc(resolution: int, centre: tuple[float, float], radius: float, supersample: int = 4) -> Image.Image:
    big = resolution * supersample
    image = Image.new("RGB", (big, big), (0, 0, 0))
    cx, cy, r = centre[0] * big, centre[1] * big, radius * big
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255))
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def blob_scene(
    index: int,
    seed: int = 0,
    resolution: int = 64,
    holdout: frozenset[str] = frozenset(),
    holdout_centres: tuple[tuple[float, float], ...] = (),
    radius: float = 0.0,
) -> tuple[Image.Image, Image.Image, str, tuple[float, float]]:
    """(image, control image, caption, centroid) of synthetic scene ``index``: a demo scene (colours,
    shapes and sizes of ``train/shapes.py``; combinations in ``holdout`` never drawn) at a centre drawn
    uniformly where the shape fits, never within ``radius`` of a ``holdout_centres`` point; the control
    image is a white disc on black at the shape's centroid (fractions of the image) with its half-width."""
    rng = random.Random(seed * 1_000_003 + index + 500_000_000)
    while True:
        colour, background = rng.sample(list(COLOURS), 2)
        shape = rng.choice(SHAPES)
        if f"{colour} {shape}" not in holdout and f"{colour} on {background}" not in holdout:
            break
    size = rng.choice(list(SIZES))
    factor = rng.uniform(0.85, 1.15)
    half = SIZES[size] * factor / 2
    margin = half + 0.02
    for _ in range(1000):
        cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
        centroid = (cx, cy + half / 3 if shape == "triangle" else cy)  # a triangle's centroid: 1/3 up from the base
        if all(math.dist(centroid, h) >= radius for h in holdout_centres):
            break
    else:
        raise ConfigError("controlnet.holdout_centres with holdout_radius leave no room for training centres")
    on = f"on {article(background)} {background} background"
    caption = f"a {size} {colour} {shape} {on}" if rng.random() < 0.3 else f"{article(colour)} {colour} {shape} {on}"
    image = render(Scene(colour, shape, background, size, "in the center", caption, (cx - 0.5, cy - 0.5, factor)),
                   resolution)  # fmt: skip
    return image, _disc(resolution, centroid, half), caption, centroid


def _synthetic(cfg: TrainConfig) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    cc = cfg.controlnet
    centres = []
    for c in cc.holdout_centres:
        if not (isinstance(c, list) and len(c) == 2 and all(isinstance(v, (int, float)) for v in c)):
            raise ConfigError(f"config key 'controlnet.holdout_centres' must hold [x, y] pairs, got {c!r}")
        centres.append((float(c[0]), float(c[1])))
    holdout = frozenset(h.lower() for h in cfg.data.holdout)
    images, hints, captions = [], [], []
    for i in range(cfg.data.size):
        image, hint, caption, _ = blob_scene(
            i, cfg.data.synthetic_seed, cfg.data.resolution, holdout, tuple(centres), cc.holdout_radius
        )
        images.append(np.asarray(image))
        hints.append(np.asarray(hint))
        captions.append(caption)
    return images, hints, captions


def conditioning_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.controlnet.conditioning_path or Path(cfg.data.path) / "conditioning")


def scan_triples(cfg: TrainConfig) -> tuple[list[tuple[Path, Path, Path]], list[Problem]]:
    """(image, caption, control image) paths of a folder, and the problems (no caption, no control image)."""
    folder, cond = Path(cfg.data.path), conditioning_folder(cfg)
    if not folder.is_dir():
        raise ConfigError(f"data.path {folder} is not a folder")
    if not cond.is_dir():
        raise ConfigError(
            f"the control images' folder {cond} does not exist: put each image's control image there under the "
            "image's name, or set controlnet.conditioning_path"
        )
    cond_resolved = cond.resolve()
    triples, problems = [], []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.resolve().is_relative_to(cond_resolved):
            continue
        caption = path.with_suffix(".txt")
        rel = path.relative_to(folder).with_suffix("")
        found = [p for s in IMAGE_SUFFIXES if (p := cond / rel.parent / (rel.name + s)).is_file()]
        if not caption.is_file():
            problems.append(Problem(path, f"no caption file {caption.name}"))
        elif not found:
            problems.append(Problem(path, f"no control image {rel.name}.png (or another image suffix) in {cond}"))
        else:
            triples.append((path, caption, found[0]))
    return triples, problems


def _folder(cfg: TrainConfig) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    triples, problems = scan_triples(cfg)
    images, hints, captions = [], [], []
    r = cfg.data.resolution
    for image_path, caption_path, hint_path in triples:
        try:
            pair = []
            for p in (image_path, hint_path):
                with Image.open(p) as im:
                    im.load()
                    pair.append(np.asarray(fit_square(im, r)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(Problem(image_path, f"unreadable image or control image ({e})"))
            continue
        images.append(pair[0])
        hints.append(pair[1])
        captions.append(caption_path.read_text(encoding="utf-8", errors="replace").strip())
    if problems:
        listing = "\n".join(f"  {p.path}: {p.reason}" for p in sorted(problems, key=lambda p: str(p.path))[:50])
        if cfg.data.on_bad == "error":
            raise DataError(f"{len(problems)} problem(s) in {cfg.data.path} (data.on_bad = 'error'):\n{listing}")
        log.warning("skipping %d file(s) of %s:\n%s", len(problems), cfg.data.path, listing)
    if not images:
        raise DataError(
            f"no usable image / control image / caption triples in data.path {cfg.data.path}: each image needs a "
            f"same-named .txt caption and a control image of the same name in {conditioning_folder(cfg)}"
        )
    return images, hints, captions


def load_control_data(cfg: TrainConfig) -> tuple[Tensor, Tensor, list[str]]:
    """(images, control images) as uint8 (N, 3, R, R), and the captions, for either kind of data."""
    images, hints, captions = (_synthetic if cfg.data.kind == "synthetic" else _folder)(cfg)

    def stack(arrays: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return stack(images), stack(hints), captions


# --- the trained network --------------------------------------------------------------------------


class ControlNetTraining:
    """The ControlNet being trained on a frozen pipeline, its control images, and its file."""

    def __init__(self, pipe, cfg: TrainConfig):
        widths = hint_widths(cfg, pipe.vae.config.downscale)
        self.net = init_controlnet(pipe.unet, widths, cfg.seed)
        self.hints: Tensor | None = None

    def load_data(self, cfg: TrainConfig) -> tuple[Tensor, list[str]]:
        """The images and captions; the control images are kept here, indexed like them."""
        images, self.hints, captions = load_control_data(cfg)
        return images, captions

    def control(self, idx: Tensor, device: torch.device) -> Callable[[Tensor, Tensor, object], ControlResiduals]:
        """The residuals function for a batch of sample indices: hints in [0, 1], as at generation."""
        hint = (self.hints[idx].float() / 255.0).to(device)
        return lambda x, t, cond: self.net(x, t, cond.context, hint, cond.vector)

    def save(self, path: Path, pipe, cfg: TrainConfig, step: int) -> Path:
        return save_controlnet(self.net, path, controlnet_metadata(pipe, cfg, step, self.net))


def controlnet_metadata(pipe, cfg: TrainConfig, step: int, net: ControlNet) -> dict[str, str]:
    """What the file was trained for and how (string values, as safetensors metadata must be)."""
    return {
        "latentforge.kind": "controlnet",
        "latentforge.family": pipe.family.name,
        "latentforge.base_model": Path(cfg.model.base).name,
        "latentforge.steps": str(step),
        "latentforge.hint_widths": json.dumps(list(net.config.hint_widths)),
        "latentforge_config": json.dumps(config_to_dict(cfg), default=str),
    }


def save_controlnet(net: ControlNet, path: str | Path, metadata: dict[str, str], dtype=torch.float32) -> Path:
    """Write ``net`` in the original layout (``control_model.<name>``)."""
    tensors = {PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    return write_safetensors(tensors, Path(path), metadata=metadata, overwrite=True)
