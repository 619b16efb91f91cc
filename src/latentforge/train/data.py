"""Training data: a folder of images with same-named ``.txt`` captions, or the synthetic scenes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from latentforge.train.config import ConfigError, DataConfig
from latentforge.train.shapes import SyntheticShapes

log = logging.getLogger("latentforge")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ConfigError):
    """The data folder has problems (``data.on_bad = "error"``) or holds nothing usable; the message lists
    the files. A ``ConfigError``: the configuration points at data that cannot be trained on."""


@dataclass
class Problem:
    path: Path
    reason: str


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and crop the centre."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's sd-scripts makes them: (width, height) multiples of ``step`` with
    sides between resolution / 2 and 2 x resolution and an area of at most resolution^2, largest height
    for each width."""
    lo, hi = max(step, resolution // 2 // step * step), resolution * 2
    sizes = {(resolution // step * step,) * 2}
    for w in range(lo, hi + 1, step):
        h = min(hi, resolution * resolution // w // step * step)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to the image's; the larger one on ties."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_batch(shapes: list[tuple[int, ...]], batch: int, seed: int, k: int) -> torch.Tensor:
    """Indices of the k-th batch of bucketed training: each epoch shuffles every bucket's samples (seeded
    by seed, epoch, bucket), cuts them into batches of at most ``batch`` and shuffles the batches; a pure
    function of k, so resuming is exact."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    count = sum(-(-len(g) // batch) for g in groups.values())
    epoch, pos = divmod(k, count)
    batches = []
    for j, key in enumerate(sorted(groups)):
        members = torch.tensor(groups[key])
        perm = members[
            torch.randperm(len(members), generator=torch.Generator().manual_seed(seed * 7919 + epoch * 131 + j))
        ]
        batches += list(perm.split(batch))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch * 131 + 65537))
    return batches[int(order[pos])]


def scan_folder(folder: Path, default_caption: str = "") -> tuple[list[tuple[Path, Path | None]], list[Problem]]:
    """(image, caption file) pairs and the problems found: images without a caption file, unless a
    ``default_caption`` stands in for it (then the pair's caption file is None)."""
    if not folder.is_dir():
        raise ConfigError(f"data.path {folder} is not a folder; point data.path at the folder of training images")
    pairs: list[tuple[Path, Path | None]] = []
    problems = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        caption = path.with_suffix(".txt")
        if caption.is_file():
            pairs.append((path, caption))
        elif default_caption:
            pairs.append((path, None))
        else:
            problems.append(Problem(path, f"no caption file {caption.name}"))
    return pairs, problems


def check_folder(cfg: DataConfig) -> None:
    """Refuse, before any model is loaded, a data folder that cannot train: missing, empty of images,
    images none of which has a caption (and no default caption), or problems with ``on_bad = "error"``.
    Only names are read here; unreadable images are found when the images are loaded."""
    if cfg.kind != "folder":
        return
    pairs, problems = scan_folder(Path(cfg.path), cfg.default_caption)
    if pairs and not (problems and cfg.on_bad == "error"):
        return
    if not pairs and not problems:
        raise DataError(
            f"no usable images in data.path {cfg.path}: it holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "put the training images there"
        )
    if cfg.on_bad == "error":
        report_problems(cfg, problems)  # raises, listing them
    raise DataError(_nothing_usable(cfg, problems))


def _nothing_usable(cfg: DataConfig, problems: list[Problem]) -> str:
    found = ""
    if problems:
        shown = "; ".join(f"{p.path.name}: {p.reason}" for p in problems[:3])
        found = f" ({len(problems)} file(s) skipped: {shown}{'; ...' if len(problems) > 3 else ''})"
    return (
        f"no usable images with captions in data.path {cfg.path}{found}: put images ({', '.join(IMAGE_SUFFIXES)}) "
        "there, each with a same-named .txt caption file, or set data.default_caption (with DreamBooth: "
        "dreambooth.instance_prompt) to caption the images that have none"
    )


def report_problems(cfg: DataConfig, problems: list[Problem]) -> None:
    """Refuse (``on_bad = "error"``) or log the problems found in the data folder."""
    if not problems:
        return
    problems.sort(key=lambda p: str(p.path))
    listing = "\n".join(f"  {p.path}: {p.reason}" for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    if cfg.on_bad == "error":
        raise DataError(f"{len(problems)} problem(s) in {cfg.path} (data.on_bad = 'error'):\n{listing}{more}")
    log.warning("skipping %d file(s) of %s:\n%s%s", len(problems), cfg.path, listing, more)


def load_folder(cfg: DataConfig) -> tuple[torch.Tensor | list[torch.Tensor], list[str], list[Problem]]:
    """All usable images (N, 3, R, R) uint8 (with ``buckets``: a list of (3, H, W), each at its bucket's
    size), their captions, and the problems (reported, then skipped or refused as ``on_bad`` says)."""
    pairs, problems = scan_folder(Path(cfg.path), cfg.default_caption)
    images, captions = [], []
    buckets = bucket_sizes(cfg.resolution, cfg.bucket_step) if cfg.buckets else None
    for image_path, caption_path in pairs:
        try:
            with Image.open(image_path) as im:
                im.load()
                if buckets is None:
                    image = fit_square(im, cfg.resolution)
                else:
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    size = nearest_bucket(im.width, im.height, buckets)
                    image = ImageOps.fit(im, size, Image.Resampling.LANCZOS)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(Problem(image_path, f"unreadable image ({e})"))
            continue
        images.append(np.asarray(image))
        if caption_path is None:
            captions.append(cfg.default_caption)
        else:
            captions.append(caption_path.read_text(encoding="utf-8", errors="replace").strip())
    report_problems(cfg, problems)
    if not images:
        raise DataError(_nothing_usable(cfg, problems))
    if buckets is not None:  # one (3, H, W) tensor per image: the sizes differ
        return [torch.from_numpy(im.copy()).permute(2, 0, 1).contiguous() for im in images], captions, problems
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return tensor, captions, problems


def load_dataset(cfg: DataConfig) -> tuple[torch.Tensor | list[torch.Tensor], list[str], list[Problem]]:
    """(images uint8 (N, 3, R, R), captions, problems) for either kind of data."""
    if cfg.kind == "synthetic":
        ds = SyntheticShapes(
            cfg.size, cfg.resolution, cfg.synthetic_seed, cfg.holdout, cfg.shapes, cfg.colours, cfg.backgrounds
        )
        images, captions = [], []
        for i in range(len(ds)):
            image, caption = ds[i]
            images.append(np.asarray(image))
            captions.append(caption)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, []
    return load_folder(cfg)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def sample_order(n: int, seed: int, first: int, count: int) -> torch.Tensor:
    """Indices of samples ``first .. first + count - 1`` of the training stream: each epoch is a fresh
    permutation seeded by (seed, epoch), so the order is a pure function of the position (exact resume)."""
    out: list[torch.Tensor] = []
    got = 0
    k = first
    while got < count:
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(n - pos, count - got)
        out.append(perm[pos : pos + take])
        got += take
        k += take
    return torch.cat(out)


def shuffle_tags(caption: str, keep: int, g: torch.Generator) -> str:
    """kohya's ``shuffle_caption``: the comma-separated tags in a random order drawn from ``g``, the first
    ``keep`` tags (``keep_tokens``) left in place."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=g).tolist() if len(tail) > 1 else range(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How many captions hold each comma-separated tag (kohya's ``ss_tag_frequency`` per folder)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return counts
