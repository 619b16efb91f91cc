"""DreamBooth with prior preservation (Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation"), as diffusers' train_dreambooth scripts do it.

Instance images are the folder ``data.path``, captioned by their ``.txt`` files or, where there is none, by
``dreambooth.instance_prompt``. Class images are the images in ``dreambooth.class_data_dir``; when it holds
fewer than ``num_class_images``, the base model generates the missing ones with latentforge's own txt2img
before anything is trained (class image i is ``class-<i>.png``, made with seed ``class_seed + i``, so a
deleted one comes back with the same pixels), written atomically and never over an existing file. Each
micro-batch is the b instance examples followed by b class examples captioned ``class_prompt`` (diffusers
concatenates them so that one forward pass serves both), and the loss is

    mean(instance losses) + prior_loss_weight * mean(class losses)

(the per-sample losses weighted 1/b and weight/b; min-SNR weighting, when on, applies to both halves). Class
examples are drawn in their own seeded order, a function of the position in training, so resuming is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.train.common import TrainProgress
from latentforge.train.config import ConfigError, DataConfig, TrainConfig
from latentforge.train.data import IMAGE_SUFFIXES, DataError, Problem, fit_square, report_problems, sample_order

log = logging.getLogger("latentforge")
GENERATED = "class-{:05d}.png"
_ORDER_SEED = 104729  # the class examples' order: a stream of its own beside the instance order


def instance_data(cfg: TrainConfig) -> DataConfig:
    """The data section for the instance images: with DreamBooth on, ``instance_prompt`` captions the images
    that have no ``.txt`` file (unless ``data.default_caption`` is set)."""
    if cfg.dreambooth.enabled and not cfg.data.default_caption:
        return dataclasses.replace(cfg.data, default_caption=cfg.dreambooth.instance_prompt)
    return cfg.data


def uses_prior(cfg: TrainConfig) -> bool:
    """Whether the run adds class examples: DreamBooth on, a class prompt and a positive prior loss weight."""
    d = cfg.dreambooth
    return d.enabled and d.prior_loss_weight > 0 and bool(d.class_prompt.strip())


def class_request(cfg: TrainConfig, index: int):
    """The generation request of class image ``index`` (square at ``data.resolution``, seed class_seed + i)."""
    from latentforge.pipelines import GenerationRequest

    d = cfg.dreambooth
    size = cfg.data.resolution
    return GenerationRequest(
        prompt=d.class_prompt,
        negative_prompt=d.class_negative_prompt,
        steps=d.class_steps,
        sampler=d.class_sampler,
        cfg_scale=d.class_cfg_scale,
        seed=d.class_seed + index,
        width=size,
        height=size,
    )


def class_images(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (sorted by name): generated ones and any the user put there."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def check(cfg: TrainConfig) -> None:
    """What can be checked before a model is loaded: the class image request (sampler name, prompt) and
    that ``class_data_dir`` is a folder or can become one."""
    if not uses_prior(cfg):
        return
    from latentforge.pipelines import RequestError

    try:
        class_request(cfg, 0).validate()
    except RequestError as e:
        raise ConfigError(
            f"the dreambooth class image settings cannot generate: {e} (class images are made at data.resolution "
            "with dreambooth.class_prompt, class_negative_prompt, class_sampler, class_steps and class_cfg_scale)"
        ) from None
    folder = Path(cfg.dreambooth.class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"dreambooth.class_data_dir {folder} is a file; point it at a folder for the class images")


def ensure_class_images(cfg: TrainConfig, pipe, progress: Callable | None = None, adapter=None, ctx=None) -> int:
    """Generate the class images that ``class_data_dir`` lacks with ``pipe`` (the base model, before
    training changes it); returns how many were generated. Images already there count, whoever made them;
    the lowest free names ``class-<i>.png`` are filled; nothing there is overwritten. ``progress`` (the
    training callback) gets a ``TrainProgress`` at step 0 whose ``message`` says how far generation is. An
    attached LoRA ``adapter`` is taken off the model while generating and put back after. Under torchrun
    (``ctx``, train/distributed.py) every rank lists the folder after a barrier, generates its share of the
    missing names (the i-th missing one on rank i mod world) and waits for the others; returns this
    rank's count."""
    if not uses_prior(cfg):
        return 0
    world = 1 if ctx is None else ctx.world
    if world > 1:
        ctx.sum(0.0)  # a barrier: no rank lists the folder while another is already writing to it
    from latentforge.io.writer import check_writable_folder

    d = cfg.dreambooth
    folder = Path(d.class_data_dir)
    missing = d.num_class_images - len(class_images(folder))
    if world > 1:
        ctx.sum(0.0)  # every rank has listed the folder
    if missing <= 0:
        log.info("using the %d class images in %s", len(class_images(folder)), folder)
        return 0
    check_writable_folder(folder, "dreambooth.class_data_dir")
    log.info("generating %d class images for %r in %s", missing, d.class_prompt, folder)
    detach = getattr(adapter, "detach_from_model", None)
    if detach is not None:
        detach()
    try:
        made = _generate(cfg, pipe, folder, missing, progress, 0 if ctx is None else ctx.rank, world)
    finally:
        if detach is not None:
            adapter.attach()
    if world > 1:
        ctx.sum(0.0)  # every rank's share is written before any rank reads the folder
    return made


def _generate(cfg: TrainConfig, pipe, folder: Path, missing: int, progress, rank: int, world: int) -> int:
    from latentforge.io.images import save_png

    free = []  # the lowest free names, as every rank found them
    index = 0
    while len(free) < missing:
        if not (folder / GENERATED.format(index)).exists():
            free.append(index)
        index += 1
    mine = free[rank::world]
    made = 0
    start = time.perf_counter()
    for index in mine:
        path = folder / GENERATED.format(index)
        if not path.exists():
            image = pipe.txt2img(request=class_request(cfg, index)).images[0]
            try:
                save_png(image, path)
            except FileExistsError:  # another process wrote that name meanwhile: it counts as there
                log.info("%s appeared while generating it; keeping that file", path)
            made += 1
            if progress is not None:
                elapsed = time.perf_counter() - start
                note = f"class image {made}/{len(mine)} generated ({path.name})"
                progress(TrainProgress(0, cfg.steps, math.nan, 0.0, elapsed, made / max(elapsed, 1e-9), note))
    return made


def load_prior(cfg: TrainConfig, encode: Callable[[torch.Tensor], torch.Tensor]) -> PriorPreservation | None:
    """The class half of the batches (``PriorPreservation.load``), or None when the run has no prior loss."""
    return PriorPreservation.load(cfg, encode) if uses_prior(cfg) else None


def _read(paths: list[Path], resolution: int, prompt: str) -> tuple[list[np.ndarray], list[Problem]]:
    """The images fitted square; images this module generated for another prompt are reported (kept: a
    user may have chosen them)."""
    from latentforge.io.infotext import parse_infotext

    images, problems, stale = [], [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                recorded = im.info.get("parameters") if path.name.startswith("class-") else None
                images.append(np.asarray(fit_square(im, resolution)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(Problem(path, f"unreadable image ({e})"))
            continue
        if isinstance(recorded, str) and parse_infotext(recorded)[0] != prompt.strip():
            stale.append(path.name)
    if stale:
        log.warning(
            "%d class image(s) were generated for another prompt than %r (%s); delete them to generate new ones",
            len(stale),
            prompt,
            ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""),
        )
    return images, problems


class PriorPreservation:
    """The class half of each micro-batch: latents of the class images, their prompt and the loss weights."""

    def __init__(self, latents: torch.Tensor, prompt: str, weight: float, seed: int):
        self.latents = latents  # (M, C, h, w)
        self.prompt = prompt
        self.weight = weight
        self.seed = seed + _ORDER_SEED

    @classmethod
    def load(cls, cfg: TrainConfig, encode: Callable[[torch.Tensor], torch.Tensor]) -> PriorPreservation:
        """Read the class images (square at ``data.resolution``; unreadable ones are problems handled as
        ``data.on_bad`` says) and encode them with ``encode`` (uint8 (N, 3, R, R) -> latents)."""
        d = cfg.dreambooth
        folder = Path(d.class_data_dir)
        images, problems = _read(class_images(folder), cfg.data.resolution, d.class_prompt)
        report_problems(dataclasses.replace(cfg.data, path=str(folder)), problems)
        if not images:
            raise DataError(
                f"dreambooth.class_data_dir {folder} holds no readable class images; remove the broken files "
                "(the missing ones are generated) or set dreambooth.prior_loss_weight = 0"
            )
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        log.info(
            "prior preservation: %d class images of %r, weight %g", len(images), d.class_prompt, d.prior_loss_weight
        )
        return cls(encode(pixels), d.class_prompt, d.prior_loss_weight, cfg.seed)

    def extend(self, x0: torch.Tensor, captions: list[str], k: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Micro-batch ``k`` of b instance latents -> (2b latents, 2b captions, 2b per-sample loss weights):
        the instance rows weighted 1/b, the class rows prior_loss_weight/b."""
        b = x0.shape[0]
        idx = sample_order(len(self.latents), self.seed, k * b, b)
        x = torch.cat([x0, self.latents[idx].to(x0.device, x0.dtype)])  # (2b, C, h, w)
        weights = torch.cat([torch.full((b,), 1.0 / b), torch.full((b,), self.weight / b)])
        return x, [*captions, *[self.prompt] * b], weights
