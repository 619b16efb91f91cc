"""img2img's resize modes against A1111's ``modules/images.py`` ``resize_image`` (v1.10, no upscaler set).

The reference below is written from that function's text: the scaled side by floor division, the paste at
``size // 2 - scaled // 2``, and Resize and Fill's bands made by PIL resizes of an empty source box. An
earlier latentforge used ``ImageOps.fit`` and edge padding, which differ on most pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from latentforge.pipelines.images import prepare_image

LANCZOS = Image.Resampling.LANCZOS


def a1111_resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    if mode == 0:
        return im.resize((width, height), resample=LANCZOS)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            bottom = resized.resize((width, fill), box=(0, resized.height, width, resized.height))
            res.paste(bottom, box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            right = resized.resize((fill, height), box=(resized.width, 0, resized.width, height))
            res.paste(right, box=(fill + src_w, 0))
    return res


SIZES = [(300, 200, 256, 256), (200, 300, 256, 256), (333, 217, 512, 384), (640, 480, 512, 512), (101, 77, 64, 96)]


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "{}x{}-to-{}x{}".format(*s))
def test_every_resize_mode_is_a1111s_pixel_for_pixel(mode, size):
    w0, h0, w, h = size
    rng = np.random.default_rng(w0 * h0 + mode)  # noise: any shift or other filter shows on most pixels
    image = Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
    ours = np.asarray(prepare_image(image, w, h, mode))
    theirs = np.asarray(a1111_resize_image(mode, image, w, h))
    assert ours.shape == (h, w, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("mode", [1, 2])
def test_masks_take_the_same_path_in_grey(mode):
    rng = np.random.default_rng(mode)
    mask = Image.fromarray(rng.integers(0, 256, (90, 170), dtype=np.uint8), "L")
    ours = prepare_image(mask, 128, 128, mode)
    assert ours.mode == "L"
    theirs = a1111_resize_image(mode, mask, 128, 128).convert("L")
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_resize_and_fill_bands_extrapolate_the_edge_not_copy_it():
    # an image fitted into a taller output: the bands above and below come from PIL's bicubic weights at
    # an empty box (1.125 * edge row - 0.125 * next row), not copies of the edge row
    rows = np.full((64, 128), 120, np.uint8)
    rows[0], rows[1], rows[-2], rows[-1] = 100, 20, 20, 100
    out = np.asarray(prepare_image(Image.fromarray(rows, "L"), 128, 192, 2)).astype(int)
    assert (out[64:128] == rows).all()
    assert (out[:64] == 110).all() and (out[128:] == 110).all()


def test_decoded_images_become_8_bit_as_a1111_truncates():
    """A1111's process_images_inner: x = clamp((x + 1) / 2, 0, 1); 255. * x (float32 numpy), then
    astype(np.uint8), a truncation (ComfyUI's SaveImage the same); diffusers rounds."""
    import torch

    from latentforge.pipelines.images import tensor_to_images

    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 0.7
    x[0, 0, 0, :4] = torch.tensor([-1.5, 1.5, 0.0, 1.0])
    ours = np.stack([np.asarray(im) for im in tensor_to_images(x)])
    unit = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).numpy()
    a1111 = (255.0 * np.moveaxis(unit, 1, 3)).astype(np.uint8)
    assert np.array_equal(ours, a1111)
    rounded = np.round(255.0 * np.moveaxis(unit, 1, 3)).astype(np.uint8)
    assert not np.array_equal(ours, rounded)  # half the values sit one level lower than rounding's


def test_crop_and_resize_of_a_thin_image_scales_only_what_shows():
    """Review finding: a 1 x 65536 image cropped and resized to 1024 x 1024 made a 1024 x 67108864 cover
    (206 GB) before cutting it. Above COVER_PIXELS only the visible part is resampled (A1111 itself could not
    make such a cover)."""
    from latentforge.pipelines import images

    rng = np.random.default_rng(7)
    thin = Image.fromarray(rng.integers(0, 256, (4000, 3, 3), dtype=np.uint8))  # 3 x 4000
    ours = np.asarray(prepare_image(thin, 256, 256, 1)).astype(int)  # cover 256 x 341333: 87 MP
    theirs = np.asarray(a1111_resize_image(1, thin, 256, 256)).astype(int)
    assert ours.shape == theirs.shape == (256, 256, 3)
    diff = np.abs(ours - theirs)  # the same picture: PIL's box resize rounds its taps differently
    assert diff.mean() < 0.5 and diff.max() <= 8
    huge = Image.new("RGB", (1, 65536), (10, 20, 30))
    assert np.asarray(images.fit_image(huge, 1024, 1024, 1)).shape == (1024, 1024, 3)
