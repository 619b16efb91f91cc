"""Depth-to-image (the ``sd2-depth`` family): img2img whose UNet also sees a depth map of the init image.

The map is the user's (an image or an array, larger = nearer; its scale does not matter) or MiDaS
DPT-Hybrid's estimate from the init image (models/midas.py, weights the user provides). The family's
``DepthConditioner`` resizes it to latent size (bicubic) and scales it to [-1, 1] per image, as the
original depth2img code and diffusers' StableDiffusionDepth2ImgPipeline do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from latentforge.pipelines.images import image_to_tensor, open_image
from latentforge.pipelines.request import DepthOptions, RequestError


def depth_from_input(value) -> Tensor:
    """(1, 1, H, W) float depth from an image (grey level; 16-bit images keep their range), a path, or an
    array/tensor (H, W)."""
    if isinstance(value, (str, Path, Image.Image)):
        image = open_image(value, what="depth map", keep_depth=True)
        arr = np.asarray(image if image.mode in ("I", "I;16", "F", "L") else image.convert("L"), dtype=np.float32)
    else:
        arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 3 and 1 in arr.shape:
        arr = arr.reshape([s for s in arr.shape if s != 1])
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise RequestError(f"a depth map must be a 2-D image or array, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise RequestError("the depth map has NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


def depth_concat(pipe, opts: DepthOptions | None, image: Image.Image, width: int, height: int) -> Tensor:
    """The depth model's extra input channel for one init image (already fitted to width x height)."""
    down = pipe.vae.config.downscale
    if opts is not None and opts.map is not None:
        depth = depth_from_input(opts.map)
    else:
        depth = estimate(pipe, opts, image)
    try:
        return pipe.family.conditioner.depth_concat(depth, (height // down, width // down)).to(pipe.device)
    except ValueError as e:
        raise RequestError(str(e)) from None


def estimate(pipe, opts: DepthOptions | None, image: Image.Image) -> Tensor:
    """MiDaS DPT-Hybrid's depth of ``image`` (1, 1, H', W'), as A1111 computes it for the first init
    image. The file is ``opts.model``, else found next to the checkpoint (models/midas_load.py); its
    absence is an error that names the file to get and where to put it."""
    from latentforge.models.midas import estimate_depth
    from latentforge.models.midas_load import MidasNotFoundError, find_midas, load_midas

    try:
        path = Path(opts.model) if opts is not None and opts.model else find_midas(pipe.info and pipe.info.source)
    except MidasNotFoundError as e:
        raise RequestError(f"{e}\nor pass a depth map instead (--depth-map, depth={{'map': ...}})") from None
    if not path.exists():
        raise RequestError(f"the depth model {path} does not exist")
    model = pipe.cached(f"midas {path.resolve()}", lambda: load_midas(path, device=pipe.device))
    with torch.inference_mode():
        depth = estimate_depth(model, (image_to_tensor(image).to(pipe.device) + 1) / 2)
    return depth.reshape(1, 1, *depth.shape[-2:]).float()
