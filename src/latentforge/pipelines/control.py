"""ControlNet units of a request (the A1111 ControlNet extension's API fields) applied to a plan.

``prepare`` runs before any work: it finds each unit's file (a path or a stem in ``pipe.folders.controlnet``),
loads the network checked against the loaded UNet (adapters/controlnet.py), reads the control image and
runs the preprocessor: "none" (the image as given), "canny" (OpenCV's Canny on the image scaled to
``processor_res`` on its short side, edge-padded to a multiple of 64 as the extension does, thresholds
``threshold_a``/``threshold_b``, defaults 100/200), "depth" (MiDaS DPT-Hybrid, models/midas.py, min-max
scaled to 0..255), "softedge_hed"/"hed" (HED soft edges, models/hed.py, on the same padded image: the
sigmoid of the fused side outputs times 255, cut to 8 bits; "softedge_hedsafe"/"hed_safe" quantize the
probabilities to 3 levels first, as the extension's ``safe_step``). The HED file is looked for in
``pipe.folders.annotators``, the unit's ControlNet folder, the ControlNet folders and the A1111 extension's
download folder (models/hed_load.py). ``apply`` fits each detected map to every pass's pixel size with the
unit's resize mode (Just Resize; Crop and Resize: cover then centre crop; Resize and Fill: fit, then pad
with the median colour of the map's border) and wraps the pass's model denoiser (``ControlledDenoiser``);
in a hires pass canny units use the soft weights, as the extension forces them there. The refiner's pass is left alone.
A unit's ``effective_region_mask`` (the image's first channel over 255) scales each of its residuals,
resized to the residual's size (bilinear), as the extension's ``apply_effective_region_mask``.

Inpaint units ("inpaint", labelled "inpaint_global_harmonious"; control_v11p_sd15_inpaint) take their image
and mask as the extension's ``{"image": ..., "mask": ...}`` dict (or an ``(image, mask)`` pair) in ``image``;
the mask is the first channel of the mask image (an RGBA mask composited over white first, as the extension's
``HWC3``), white = repaint, and must have the image's size; no mask masks nothing. As the extension's
``detectmap_proc``, image and mask are fitted to each pass together in float32 (nearest when the image has
3 to 199 colours, else area down / cubic up; Resize and Fill pads with the border's median colour and a
masked pad), the mask is then thresholded at > 127, and the hint is the image over 255 with the masked
pixels set to -1 (the extension's ``c * (1 - m) - m`` in hook.py, diffusers' ``make_inpaint_condition``).
"inpaint_only" outside img2img inpainting also holds the unmasked area (``Restore`` in adapters/controlnet.py,
on every pass of the loaded UNet, and ``restored_pixels`` on the decoded images); with A1111's own img2img
mask it runs as "inpaint", as the extension falls back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from latentforge.adapters.controlnet import (
    ActiveUnit,
    ControlledDenoiser,
    ControlNetError,
    Restore,
    load_controlnet,
)
from latentforge.adapters.folders import AdapterNotFound
from latentforge.io.components import LoadError
from latentforge.io.hashing import legacy_model_hash
from latentforge.io.tensorfile import CheckpointError
from latentforge.models.controlnet import ControlNet
from latentforge.pipelines.checks import CONTROL_HR_OPTIONS
from latentforge.pipelines.control_input import (
    INPAINT_MODULES,
    crop_to_area,
    img2img_input,
    masked_area,
    read_control_image,
    read_inpaint_mask,
    split_inpaint_image,
)
from latentforge.pipelines.control_resize import count_colours, resize_map
from latentforge.pipelines.plan import Plan
from latentforge.pipelines.request import (
    CONTROL_MODES,
    CONTROL_RESIZE_MODES,
    ControlUnit,
    GenerationRequest,
    RequestError,
    mode_index,
)

DEFAULT_RES = 512
CANNY_DEFAULTS = (100.0, 200.0)
HIRES_SOFT_MODULES = ("canny",)  # the extension forces soft weights in the hires pass for edge maps
MAX_PREPROCESS_PIXELS = 4096 * 4096  # the padded control image of the pad64 preprocessors (canny)
MAX_HED_PIXELS = 4096 * 2048  # HED keeps two 64-channel float32 maps of this size: about 4 GB
HED_MODULES = {"softedge_hed": False, "hed": False, "softedge_hedsafe": True, "hed_safe": True}  # name -> safe


@dataclass
class PreparedUnit:
    unit: ControlUnit
    net: ControlNet
    name: str  # "stem [hash]" as the extension writes it
    detected: np.ndarray | None  # (H, W, 3) uint8, the preprocessor's output (pixel perfect: per pass size)
    region: Tensor | None = None  # the effective region mask (1, 1, h, w) in [0, 1], or None
    image: np.ndarray | None = None  # the control image (H, W, 3) uint8, for pixel perfect
    near: Path | None = None  # the ControlNet file (its folder is searched for preprocessor models)
    maps: dict = field(default_factory=dict)  # pixel perfect: processor resolution -> detected map
    mask: np.ndarray | None = None  # inpaint units: the mask (H, W) uint8 at the image's size, white = repaint
    fit_mode: int | None = None  # img2img's resize mode when the unit took the init image (the infotext keeps its own)
    colours: int | None = None  # inpaint units: colours of the image (the extension's resize picks by it)
    restore: bool = False  # inpaint_only outside img2img inpainting: the unmasked area is held (``apply``)

    def perfect_res(self, width: int, height: int) -> int:
        """The extension's ``pixel_perfect_resolution`` for a pass of ``width`` x ``height``."""
        h, w = self.image.shape[:2]
        k = (min if self.resize_mode == 2 else max)(height / h, width / w)
        return int(np.round(k * min(h, w)))

    def detected_at(self, pipe, width: int, height: int) -> tuple[np.ndarray, int]:
        """The detected map for a pass of ``width`` x ``height`` and the preprocessor resolution it used:
        with pixel perfect, the extension's ``pixel_perfect_resolution`` (the image's short side times the
        scale that covers the pass, or fits it for Resize and Fill)."""
        if not self.unit.pixel_perfect:
            return self.detected, int(self.unit.processor_res)
        res = self.perfect_res(width, height)
        if res not in self.maps:
            unit = dataclasses.replace(self.unit, processor_res=max(res, 1))
            self.maps[res] = preprocess(pipe, unit, Image.fromarray(self.image), self.near)
        return self.maps[res], res

    @property
    def control_mode(self) -> int:
        return mode_index(self.unit.control_mode, CONTROL_MODES, "control_mode")

    @property
    def resize_mode(self) -> int:
        """How the image is fitted to a pass: the unit's, or img2img's for the init image it took."""
        if self.fit_mode is not None:
            return self.fit_mode
        return mode_index(self.unit.resize_mode, CONTROL_RESIZE_MODES, "resize_mode")


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if img.shape[1] == width and img.shape[0] == height:
        return img
    shrink = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def pad64(img: np.ndarray, resolution: int, max_pixels: int = MAX_PREPROCESS_PIXELS) -> tuple[np.ndarray, int, int]:
    """The extension's ``resize_image_with_pad``: scale the short side to ``resolution`` (cubic up, area
    down), pad right and bottom to multiples of 64 with edge pixels; -> (padded, height, width) of the
    scaled image, which the caller crops its result back to. A padded size above ``max_pixels`` (a long
    thin image at a large resolution) is a RequestError before any work."""
    import cv2

    h, w = img.shape[:2]
    k = resolution / min(h, w)
    th, tw = round(h * k), round(w * k)
    if (th + -th % 64) * (tw + -tw % 64) > max_pixels:
        raise RequestError(
            f"the control image {w}x{h} at processor_res {resolution} becomes {tw}x{th} pixels, more than the "
            f"preprocessor's limit of {max_pixels} pixels; use a smaller processor_res or a less elongated image"
        )
    scaled = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(scaled, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge"), th, tw


def canny(img: np.ndarray, low: float, high: float, resolution: int) -> np.ndarray:
    """The extension's canny preprocessor: OpenCV Canny on ``pad64``'s image, the padding cropped; 3 equal
    channels."""
    import cv2

    padded, th, tw = pad64(img, resolution)
    edges = cv2.Canny(padded, low, high)[:th, :tw]
    return np.repeat(edges[:, :, None], 3, axis=2)


def soft_edges(model, img: np.ndarray, resolution: int, safe: bool = False) -> np.ndarray:
    """The extension's HED preprocessor (``softedge_hed``; ``safe``: ``softedge_hedsafe``): the HED network
    (models/hed.py) on ``pad64``'s RGB 0..255 image in float32, the sigmoid of its fused logits in float64,
    ``safe`` quantizing to floor(p * 3) / 2, times 255 clipped and cut to 8 bits, the padding cropped; 3 equal
    channels."""
    padded, th, tw = pad64(img, resolution, MAX_HED_PIXELS)
    param = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(padded)).to(param.device, torch.float32).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = model(x)[0, 0].double().cpu().numpy()
    edge = 1.0 / (1.0 + np.exp(-logits))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    out = (edge * 255.0).clip(0, 255).astype(np.uint8)[:th, :tw]
    return np.repeat(out[:, :, None], 3, axis=2)


def _hed(pipe, near: Path | None):
    """The HED network for the ``softedge_hed`` units (loaded once per file, float32 on the pipe's device)."""
    from latentforge.models.hed_load import HEDNotFoundError, find_hed, load_hed

    dirs = [*pipe.folders.annotators, *([near.parent] if near is not None else []), *pipe.folders.controlnet]
    try:
        path = find_hed(pipe.info and pipe.info.source, dirs)
    except HEDNotFoundError as e:
        raise RequestError(str(e)) from None
    try:
        return pipe.cached(f"hed {path.resolve()} {pipe.device}", lambda: load_hed(path, device=pipe.device))
    except (CheckpointError, LoadError) as e:
        raise RequestError(str(e)) from None


def _depth(pipe, img: np.ndarray, resolution: int) -> np.ndarray:
    from latentforge.pipelines.depth import estimate

    h, w = img.shape[:2]
    k = resolution / min(h, w)
    scaled = _resize(img, round(w * k), round(h * k))
    d = estimate(pipe, None, Image.fromarray(scaled))[0, 0]
    d = d - d.min()
    d = d / d.max().clamp_min(1e-8)
    out = (d * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return np.repeat(out[:, :, None], 3, axis=2)


def preprocess(pipe, unit: ControlUnit, image: Image.Image, near: Path | None = None) -> np.ndarray:
    """The unit's preprocessor on its control image -> (H, W, 3) uint8; ``near``: the unit's ControlNet
    file, whose folder is searched for preprocessor models."""
    img = np.asarray(image.convert("RGB"))
    res = unit.processor_res if unit.processor_res > 0 else DEFAULT_RES
    if unit.module == "canny":
        low = unit.threshold_a if unit.threshold_a >= 0 else CANNY_DEFAULTS[0]
        high = unit.threshold_b if unit.threshold_b >= 0 else CANNY_DEFAULTS[1]
        return canny(img, low, high, res)
    if unit.module == "depth":
        return _depth(pipe, img, res)
    if unit.module in HED_MODULES:
        return soft_edges(_hed(pipe, near), img, res, safe=HED_MODULES[unit.module])
    return img


def fit(detected: np.ndarray, width: int, height: int, mode: int) -> np.ndarray:
    """A detected map at ``width`` x ``height``: 0 Just Resize, 1 Crop and Resize, 2 Resize and Fill; each
    resize as the extension's ``high_quality_resize`` (control_resize.py)."""
    h, w = detected.shape[:2]
    if mode == 0:
        return resize_map(detected, width, height)
    k = max(height / h, width / w) if mode == 1 else min(height / h, width / w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    scaled = resize_map(detected, nw, nh)
    if mode == 1:
        top, left = (nh - height) // 2, (nw - width) // 2
        return scaled[top : top + height, left : left + width]
    border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top : top + nh, left : left + nw] = scaled
    return out


def _inpaint_resize(rgba: np.ndarray, width: int, height: int, colours: int) -> np.ndarray:
    """The extension's ``high_quality_resize`` of an inpaint map (float32 RGB + mask): nearest for 3 to 199
    colours, else area when shrinking and cubic otherwise; the mask then thresholded at > 127."""
    import cv2

    h, w = rgba.shape[:2]
    out = rgba
    if (h, w) != (height, width):
        if 2 < colours < 200:
            interpolation = cv2.INTER_NEAREST
        elif width * height < w * h:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        out = cv2.resize(rgba, (width, height), interpolation=interpolation)
    out = out.copy()
    out[:, :, 3] = np.where(out[:, :, 3] > 127, 255.0, 0.0)
    return out


def inpaint_feed(
    image: np.ndarray, mask: np.ndarray | None, width: int, height: int, mode: int, colours: int | None = None
) -> Tensor:
    """An inpaint unit's input at a pass's size (1, 4, height, width): the image and mask fitted together as
    the extension's ``detectmap_proc`` does, over 255 (the colours unclipped, as its float resize leaves
    them; the mask 0 or 1)."""
    if mask is None:
        mask = np.zeros(image.shape[:2], np.uint8)
    rgba = np.concatenate([image, mask[:, :, None]], axis=2).astype(np.float32)
    colours = count_colours(image) if colours is None else colours
    h, w = image.shape[:2]
    if mode == 0:
        out = _inpaint_resize(rgba, width, height, colours)
    elif mode == 1:
        k = max(height / h, width / w)
        nh, nw = max(1, round(h * k)), max(1, round(w * k))
        top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
        out = _inpaint_resize(rgba, nw, nh, colours)[top : top + height, left : left + width]
    else:
        k = min(height / h, width / w)
        nh, nw = max(1, round(h * k)), max(1, round(w * k))
        border = np.concatenate([rgba[0], rgba[-1], rgba[:, 0], rgba[:, -1]], axis=0)
        colour = np.median(border, axis=0).astype(np.float32)
        colour[3] = 255.0  # the pad is masked: outpainting
        out = np.tile(colour[None, None], (height, width, 1))
        top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[top : top + nh, left : left + nw] = _inpaint_resize(rgba, nw, nh, colours)
    return torch.from_numpy(np.ascontiguousarray(out) / 255.0).float().permute(2, 0, 1)[None].contiguous()


def inpaint_hint(feed: Tensor) -> Tensor:
    """An inpaint unit's hint (1, 3, H, W) from its ``inpaint_feed``: the image with the masked pixels
    (mask > 0.5) at -1, the extension's ``c * (1 - m) - m``."""
    c, m = feed[:, :3], (feed[:, 3:] > 0.5).float()
    return (c * (1 - m) - m).contiguous()


def hint_tensor(detected: np.ndarray, width: int, height: int, mode: int) -> Tensor:
    """(1, 3, height, width) in [0, 1], as the extension and diffusers give ControlNets their image."""
    arr = fit(detected, width, height, mode)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def prepare(
    pipe, req: GenerationRequest, init_images: list | None = None, size: tuple[int, int] | None = None
) -> list[PreparedUnit]:
    """Load every unit's ControlNet and preprocess its image; any problem is a ``RequestError`` naming the
    unit, before any sampling work. In img2img (``init_images``) a unit without an image takes the first
    init image (``img2img_input``). ``size``: the output's (width, height) when the request leaves it out."""
    units = []
    job = req.inpaint
    area = None  # "only masked" img2img: the units' inputs are cut to the masked area (control_input.py)
    if req.control and init_images and job is not None and job.inpaint_full_res and any(job.outpaint):
        raise RequestError(
            "ControlNet units with outpainting and 'only masked' (inpaint_full_res) are not available: the "
            "masked area is the grown canvas's border; send inpaint_full_res false"
        )
    cut = any(u.inpaint_crop_input_image is True for u in req.control)
    if cut and init_images and job is not None and job.mask is not None:
        area = masked_area(req, size or (req.width, req.height), "control units")
    for i, unit in enumerate(req.control):
        where = f"control unit {i}"
        try:
            path = pipe.folders.find_controlnet(unit.model)
        except AdapterNotFound as e:
            raise RequestError(f"{where}: {e}") from None
        inpaint = unit.module in INPAINT_MODULES
        if inpaint and pipe.family.conditioner.kind == "inpaint":
            raise RequestError(
                f"{where}: an inpaint unit with an inpainting model is not available (the extension rewrites the "
                "model's mask channels from the unit); use a plain model with the inpaint ControlNet"
            )
        # inpaint_only: in img2img inpainting the extension runs it as "inpaint" (A1111 holds the area itself)
        restore = unit.module == "inpaint_only" and not (init_images and job is not None and job.mask is not None)
        fit_mode = None
        if unit.image is None:
            if not init_images:
                raise RequestError(f"{where}: no control image was given ('image')")
            if req.inpaint is not None and any(req.inpaint.outpaint):
                raise RequestError(f"{where}: with outpainting, give the unit its own image (the canvas grows)")
            image, mask = img2img_input(init_images[0], req, unit, where)
            fit_mode = req.resize_mode if req.resize_mode in (0, 1, 2) else 0  # 3 (latent upscale): Just Resize
        else:
            value, mask_value = split_inpaint_image(unit.image, f"{where} image") if inpaint else (unit.image, None)
            image = read_control_image(value, f"{where} image")
            mask = None if mask_value is None else read_inpaint_mask(mask_value, image.size, f"{where} mask")
        if area is not None and unit.inpaint_crop_input_image:
            mode = (
                fit_mode if fit_mode is not None else mode_index(unit.resize_mode, CONTROL_RESIZE_MODES, "resize_mode")
            )
            image, mask = crop_to_area(image, mask, area, mode, *(size or (req.width, req.height)))
        key = f"controlnet {Path(path).resolve()} {pipe.dtype}"
        try:
            net = pipe.cached(key, lambda p=path: load_controlnet(p, pipe.unet.config, pipe.dtype, pipe.device))
        except (ControlNetError, CheckpointError) as e:
            raise RequestError(f"{where}: {e}") from None
        name = f"{Path(path).stem} [{legacy_model_hash(path)}]"
        try:  # pixel perfect: per pass size (``apply``)
            detected = None if unit.pixel_perfect or inpaint else preprocess(pipe, unit, image, Path(path))
        except RequestError as e:
            raise RequestError(f"{where}: {e}") from None
        region = None
        if unit.effective_region_mask is not None:  # the extension: the image's first channel / 255
            acts = np.asarray(read_control_image(unit.effective_region_mask, f"{where} effective_region_mask"))
            region = torch.from_numpy(acts[:, :, 0].astype(np.float32) / 255.0)[None, None]
        pixels = np.asarray(image)
        colours = count_colours(pixels) if inpaint else None
        units.append(
            PreparedUnit(
                unit,
                net,
                name,
                detected,
                region,
                pixels,
                Path(path),
                mask=mask,
                fit_mode=fit_mode,
                colours=colours,
                restore=restore,
            )
        )
    return units


def apply(plan: Plan, pipe, units: list[PreparedUnit]) -> None:
    """Wrap the model denoiser of each pass that runs the loaded UNet with the units' control (with a hires
    pass, each unit's ``hr_option`` says which passes it controls)."""
    if not units:
        return
    down = pipe.vae.config.downscale
    hires = any(p.name == "hires" for p in plan.passes)
    finals: dict[int, Tensor] = {}  # inpaint_only units: the feed of the last pass, for the decoded images
    for p in plan.passes:
        if p.model.unet is not pipe.unet:
            continue
        height, width = p.shape[1] * down, p.shape[2] * down
        active, restores = [], []
        for i, u in enumerate(units):
            option = mode_index(u.unit.hr_option, CONTROL_HR_OPTIONS, "hr_option")
            skip = hires and option == (1 if p.name == "hires" else 2)  # "Low res only" / "High res only"
            if u.unit.module in INPAINT_MODULES:  # no preprocessor: the image and its mask
                feed = inpaint_feed(u.image, u.mask, width, height, u.resize_mode, u.colours)
                if u.restore:  # the extension holds the area in every pass, whatever hr_option says
                    restores.append(_restore(pipe, feed, float(u.unit.weight), down))
                    finals[i] = feed
                hint = inpaint_hint(feed)
            elif skip:
                continue
            else:
                try:
                    detected, _ = u.detected_at(pipe, width, height)
                except RequestError as e:
                    raise RequestError(f"control unit {i}: {e}") from None
                hint = hint_tensor(detected, width, height, u.resize_mode)
            if skip:
                continue
            active.append(
                ActiveUnit(
                    u.net,
                    hint.to(device=pipe.device, dtype=pipe.dtype),  # once, not a host-to-GPU copy per step
                    float(u.unit.weight),
                    float(u.unit.guidance_start),
                    float(u.unit.guidance_end),
                    u.control_mode,
                    soft=p.name == "hires" and u.unit.module in HIRES_SOFT_MODULES,
                    region=None if u.region is None else u.region.to(pipe.device),
                )
            )
        if not active and not restores:
            continue
        uncond = [] if p.uncond is None else [c.context for _, c in p.uncond.entries]
        p.model = ControlledDenoiser(p.model, active, p.sigmas, uncond, restores)
    if finals:
        plan.finish_pixels = restored_pixels([finals[i] for i in sorted(finals)])
    plan.infotext.update(infotext(units))


def _restore(pipe, feed: Tensor, weight: float, down: int) -> Restore:
    """inpaint_only's hold for one pass (adapters/controlnet.py ``Restore``): the latent of the feed's
    image (its posterior mean, as latentforge encodes init images) and the mask max-pooled to latent size."""
    image = (feed[:, :3] * 2 - 1).to(pipe.device)
    latent = pipe.vae.encode(image).float()
    mask = F.max_pool2d(feed[:, 3:], (down + 2, down + 2), stride=(down, down), padding=1)
    return Restore(latent, mask, weight)


def restored_pixels(feeds: list[Tensor]):
    """The extension's inpaint_only post-processing of each decoded image in [0, 1] (``postprocess_batch``,
    before the 8-bit truncation): the unit's image outside its mask, dilated by a 7 x 7 square and
    box-blurred 7 x 7 (its "ControlNet inpainting Gaussian blur sigma" setting, 7), ``y = m * x + (1 - m) *
    image`` clipped to [0, 1]; an image of another size is left alone, as the extension does."""
    import cv2

    blends = []
    for feed in feeds:
        m = cv2.dilate(feed[0, 3].numpy().astype(np.float32), np.ones((7, 7), np.uint8))
        blends.append((feed[:, :3].float(), torch.from_numpy(cv2.blur(m, (7, 7)))[None, None]))

    def finish(y: Tensor) -> Tensor:
        for image, m in blends:
            if y.shape[-2:] == image.shape[-2:]:
                m = m.to(y.device)
                y = (m * y.clamp(0, 1) + (1 - m) * image.to(y.device)).clamp(0, 1)
        return y

    return finish


def infotext(units: list[PreparedUnit]) -> dict[str, str]:
    """``ControlNet N`` fields as the extension writes them: "Name: value" in its field order, numbers as
    Python prints floats, fields left at -1 (unused by the preprocessor) left out; canny's thresholds and
    the processor resolution with their defaults for -1. Written as the unit was sent: the extension
    serializes units before pixel perfect picks a resolution (get_enabled_units runs before get_control)."""
    out = {}
    for i, u in enumerate(units):
        unit = u.unit
        low, high, res = float(unit.threshold_a), float(unit.threshold_b), int(unit.processor_res)
        if unit.module == "canny":
            low = low if low >= 0 else CANNY_DEFAULTS[0]
            high = high if high >= 0 else CANNY_DEFAULTS[1]
        if unit.module in INPAINT_MODULES:  # hidden sliders of range 0..1: outside it, their default 0.5
            low, high = (v if 0 <= v <= 1 else 0.5 for v in (low, high))
            res = float(unit.processor_res) if 0 <= float(unit.processor_res) <= 1 else 0.5  # written before
            # pixel perfect runs (the extension's write_infotext); inpaint units use no resolution
        elif unit.module != "none" and res <= 0:
            res = DEFAULT_RES
        fields = {
            "Module": unit.module,
            "Model": u.name,
            "Weight": float(unit.weight),
            "Resize Mode": CONTROL_RESIZE_MODES[mode_index(unit.resize_mode, CONTROL_RESIZE_MODES, "resize_mode")],
            "Processor Res": res,
            "Threshold A": low,
            "Threshold B": high,
            "Guidance Start": float(unit.guidance_start),
            "Guidance End": float(unit.guidance_end),
            "Pixel Perfect": bool(unit.pixel_perfect),
            "Control Mode": CONTROL_MODES[u.control_mode],
        }
        out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items() if v != -1)
    return out
