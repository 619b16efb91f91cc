"""ControlNet units in "only masked" img2img inpainting (``inpaint_full_res``, the A1111 API's default).

The generation works on the mask's padded region scaled to the output size, so the ControlNet extension
cuts each unit's input to the same region (``try_crop_image_with_a1111_mask`` in scripts/controlnet.py,
on by default through the unit's ``inpaint_crop_input_image``): every channel of the input is fitted to the
A1111 mask's size with the unit's resize mode, cropped to the region of the mask as ``prepare_mask`` made
it (``get_crop_region`` then ``expand_crop_region``), and fitted to the output with Resize and Fill.
The reference below is written from that text, with A1111's ``resize_image`` from test_resize_modes.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.adapters.controlnet import ControlledDenoiser
from latentforge.pipelines.request import RequestError
from test_controlnet_inpaint import _img2img_plan, _make_inpaint_condition
from test_resize_modes import a1111_resize_image
from tiny import build_reference, diffusers_controlnet, save_folder


def get_crop_region(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    """A1111's ``masking.get_crop_region`` (the extension's call): the first and last rows and columns that
    hold a nonzero value, grown by ``pad`` within the image."""
    h, w = mask.shape
    cols = [i for i in range(w) if (mask[:, i] != 0).any()]
    rows = [i for i in range(h) if (mask[i] != 0).any()]
    left, right = cols[0], w - 1 - cols[-1]
    top, bottom = rows[0], h - 1 - rows[-1]
    return max(left - pad, 0), max(top - pad, 0), min(w - right + pad, w), min(h - bottom + pad, h)


def expand_crop_region(region, pw: int, ph: int, iw: int, ih: int) -> tuple[int, int, int, int]:
    """A1111's ``masking.expand_crop_region``: grow the short side to the processing size's ratio."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > pw / ph:
        diff = int((x2 - x1) / (pw / ph) - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= ih:
            y1, y2 = y1 - (y2 - ih), ih
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, ih)
    else:
        diff = int((y2 - y1) * (pw / ph) - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= iw:
            x1, x2 = x1 - (x2 - iw), iw
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, iw)
    return x1, y1, x2, y2


def extension_crop(channels: np.ndarray, a1111_mask: np.ndarray, pad: int, width: int, height: int, mode: int):
    """The extension's crop of a unit's input (H, W, C) for an output of ``width`` x ``height``."""
    mh, mw = a1111_mask.shape
    region = expand_crop_region(get_crop_region(a1111_mask, pad), width, height, mw, mh)
    out = []
    for i in range(channels.shape[2]):
        ch = a1111_resize_image(mode, Image.fromarray(channels[:, :, i]), mw, mh).crop(region)
        arr = np.asarray(a1111_resize_image(2, ch, width, height))
        out.append(arr[:, :, 0] if arr.ndim == 3 else arr)
    return np.stack(out, axis=2)


def prepare_mask(mask: np.ndarray, blur: float) -> np.ndarray:
    """The extension's ``prepare_mask`` for a grey mask with ``mask_blur`` (cv2, along x then y)."""
    import cv2

    k = 2 * int(2.5 * blur + 0.5) + 1
    return cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), blur), (1, k), blur)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn_area")
    ref = build_reference("sd1")
    _, path = diffusers_controlnet(ref, tmp)
    return latentforge.load(save_folder(ref, tmp / "m")), path


def _init() -> np.ndarray:  # 96 wide, 80 high: not the output's ratio, so the region grows
    y, x = np.mgrid[0:80, 0:96]
    rng = np.random.default_rng(5)
    base = np.stack([x * 2.6, y * 3.1, (x * y) % 97 * 2.5], axis=-1) + rng.normal(0, 12, (80, 96, 3))
    return base.clip(0, 255).astype(np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((80, 96), np.uint8)
    m[30:46, 52:80] = 255  # wider than high: the crop grows in height to the square output
    return m


def _hint(ours, unit, init, **request):
    plan = _img2img_plan(ours, unit, Image.fromarray(init), **request)
    models = [p.model for p in plan.passes if isinstance(p.model, ControlledDenoiser)]
    assert models, "the unit controls no pass"
    return models[0].units[0].hint.float()


REQUEST = dict(inpaint_full_res=True, inpaint_full_res_padding=6, mask_blur=2, denoising_strength=0.5)


def test_inpaint_unit_without_image_is_cut_to_the_masked_area(setup):
    ours, path = setup
    init, mask = _init(), _mask()
    unit = {"model": str(path), "module": "inpaint_global_harmonious"}
    got = _hint(ours, unit, init, mask=Image.fromarray(mask), resize_mode=0, **REQUEST)
    a1111 = prepare_mask(mask, 2)
    rgbm = np.concatenate([init, a1111[:, :, None]], axis=2)
    cut = extension_crop(rgbm, a1111, 6, 64, 64, mode=0)
    want = _make_inpaint_condition(cut[:, :, :3], cut[:, :, 3])
    assert got.shape == want.shape == (1, 3, 64, 64)
    assert torch.equal(got, want)
    # the hint shows the cut: over 10% of it is masked, against 6% of the whole image
    assert (got[0, 0] == -1).float().mean() > 0.1


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_unit_with_its_own_image_is_fitted_to_the_mask_then_cut(setup, mode):
    ours, path = setup
    init, mask = _init(), _mask()
    own = np.asarray(Image.fromarray(_init()[::-1, ::-1]).resize((120, 70)))  # another size and ratio
    unit = {"model": str(path), "module": "none", "image": Image.fromarray(own), "resize_mode": mode}
    got = _hint(ours, unit, init, mask=Image.fromarray(mask), **REQUEST)
    cut = extension_crop(own, prepare_mask(mask, 2), 6, 64, 64, mode=mode)
    assert torch.equal(got, torch.from_numpy(cut.astype(np.float32) / 255.0).permute(2, 0, 1)[None])


def test_crop_off_blank_mask_and_refusals(setup):
    ours, path = setup
    init, mask = _init(), _mask()
    unit = {"model": str(path), "module": "none"}
    whole = _hint(ours, unit, init, mask=Image.fromarray(mask), resize_mode=0, **{**REQUEST, "inpaint_full_res": False})
    off = _hint(ours, {**unit, "inpaint_crop_input_image": False}, init, mask=Image.fromarray(mask), **REQUEST)
    assert torch.equal(off, whole)  # the whole input fitted to the crop's generation, as the extension
    cut = _hint(ours, unit, init, mask=Image.fromarray(mask), **REQUEST)
    assert not torch.equal(cut, whole)
    blank = _hint(ours, unit, init, mask=Image.fromarray(np.zeros_like(mask)), **REQUEST)
    assert torch.equal(blank, whole)  # an empty mask: A1111 inpaints the whole picture, nothing is cut
    with pytest.raises(RequestError, match="inpaint_crop_input_image must be true or false"):
        _hint(ours, {**unit, "inpaint_crop_input_image": "yes"}, init, mask=Image.fromarray(mask), **REQUEST)
    with pytest.raises(RequestError, match="outpainting"):
        _hint(ours, {**unit, "image": Image.fromarray(init)}, init, inpaint={"outpaint_right": 32}, **REQUEST)


def test_only_masked_generation_with_a_unit_keeps_the_pixels_outside_the_area(setup):
    ours, path = setup
    init, mask = _init(), _mask()
    unit = {"model": str(path), "module": "inpaint_global_harmonious"}
    result = ours.img2img(
        Image.fromarray(init), "x", mask=Image.fromarray(mask), control=[unit], steps=3, seed=4, width=64, height=64,
        **REQUEST,
    )  # fmt: skip
    out = np.asarray(result.images[0])
    assert out.shape == init.shape
    far = np.ones(mask.shape, bool)
    far[20:56, 40:92] = False  # the mask, its blur and a margin
    assert np.array_equal(out[far], init[far])
    assert not np.array_equal(out[30:46, 52:80], init[30:46, 52:80])
    assert "Inpaint area: Only masked" in result.infotexts[0] and "ControlNet 0" in result.infotexts[0]


def test_review_findings_region_masks_sizes_and_masks_of_another_size(setup):
    """Review findings: a unit's effective_region_mask overwrote the masked area the next unit is cut to; the
    output size left to the init image (the Python API's default) failed; a mask of another size than the
    init image was refused with units, where the extension fits each input to the mask's size."""
    ours, path = setup
    init, mask = _init(), _mask()
    plain = {"model": str(path), "module": "none", "image": Image.fromarray(init)}
    acts = Image.fromarray(np.full((80, 96), 255, np.uint8))
    two = [{**plain, "effective_region_mask": acts}, plain]
    result = ours.txt2img("x", control=two, steps=1, width=64, height=64, seed=1)
    assert len(result.images) == 1
    only = dict(mask=Image.fromarray(mask), inpaint_full_res=True, mask_blur=0, denoising_strength=0.5)
    result = ours.img2img(Image.fromarray(init), "x", control=two, steps=1, seed=1, **only)  # size: the init's
    assert result.images[0].size == (96, 80)
    big_mask = Image.fromarray(mask).resize((192, 160), Image.Resampling.NEAREST)
    result = ours.img2img(Image.fromarray(init), "x", control=[plain], steps=1, seed=1, width=64, height=64,
                          **{**only, "mask": big_mask})  # fmt: skip
    assert result.images[0].size == (96, 80)
