"""A1111's noise: the CUDA generator reproduced on the CPU (sources GPU/NV), variation seeds, seed resize
and ENSD, against published values and A1111's documented formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.pipelines.metadata import request_from_infotext
from latentforge.sampling.noise import ImageNoise, NoiseOptions, PhiloxGenerator, philox4x32


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        # Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_cuda_randn_of_seed_0_as_published():
    """torch.randn((3, 4), device="cuda") after seed 0, as A1111 documents it for its NV generator."""
    expected = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    torch.testing.assert_close(PhiloxGenerator(0).randn((3, 4)), torch.tensor(expected), rtol=0, atol=1e-6)
    gpu = ImageNoise([0], (3, 4), options=NoiseOptions(source="GPU")).next()[0]  # no CUDA here: computed
    torch.testing.assert_close(gpu, torch.tensor(expected), rtol=0, atol=1e-6)


def test_later_draws_advance_the_philox_offset():
    g = PhiloxGenerator(123)
    first, second = g.randn((2, 5)), g.randn((2, 5))
    assert not torch.equal(first, second) and g.offset == 2
    assert torch.equal(PhiloxGenerator(123).randn((2, 5)), first)


def _cpu(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_variation_seeds_follow_a1111s_slerp():
    shape = (4, 6, 6)
    base, sub = _cpu(10, shape), _cpu(77, shape)
    for strength in (0.0, 0.3, 1.0):
        noise = ImageNoise([10], shape, subseeds=[77], options=NoiseOptions(subseed_strength=strength)).next()[0]
        # A1111: norms along dim 1 of (C, H, W), linear blend when nearly parallel
        lo, hi = base / base.norm(dim=1, keepdim=True), sub / sub.norm(dim=1, keepdim=True)
        omega = torch.acos((lo * hi).sum(1))
        expected = (torch.sin((1 - strength) * omega) / torch.sin(omega)).unsqueeze(1) * base + (
            torch.sin(strength * omega) / torch.sin(omega)
        ).unsqueeze(1) * sub
        torch.testing.assert_close(noise, expected)
    torch.testing.assert_close(
        ImageNoise([10], shape, subseeds=[77], options=NoiseOptions(subseed_strength=0.0)).next()[0], base
    )


def test_seed_resize_centres_the_small_noise():
    """'Seed resize from' 32x32 px (4x4 latent) at 8x8: the 4x4 first draw of the seed sits in the
    centre of the 8x8 first draw of the image's generator."""
    noise = ImageNoise([5], (4, 8, 8), options=NoiseOptions(seed_resize_from=(32, 32))).next()[0]
    expected = _cpu(5, (4, 8, 8))
    expected[:, 2:6, 2:6] = _cpu(5, (4, 4, 4))
    assert torch.equal(noise, expected)
    # larger than the image: the centre of the big noise is cropped in
    noise = ImageNoise([5], (4, 4, 4), options=NoiseOptions(seed_resize_from=(64, 48))).next()[0]
    assert torch.equal(noise, _cpu(5, (4, 6, 8))[:, 1:5, 2:6])


def test_ensd_reseeds_the_draws_after_the_first():
    shape = (4, 4, 4)
    n = ImageNoise([3, 4], shape, options=NoiseOptions(eta_noise_seed_delta=31337))
    first, second = n.next(), n.next()
    assert torch.equal(first[1], _cpu(4, shape))
    assert torch.equal(second[0], _cpu(3 + 31337, shape)) and torch.equal(second[1], _cpu(4 + 31337, shape))


def test_infotext_fields_round_trip_and_from_reproduces(tmp_path):
    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    pipe = latentforge.load(path)
    options = dict(seed=9, subseed=40, subseed_strength=0.4, eta_noise_seed_delta=31337, rng="NV", steps=4)
    result = pipe.txt2img("a red circle", sampler="Euler a", seed_resize_from_w=48, seed_resize_from_h=48, **options)
    text = result.infotexts[0]
    for field in ("Variation seed: 40", "Variation seed strength: 0.4", "Seed resize from: 48x48", "ENSD: 31337"):
        assert field in text
    assert "RNG: NV" in text
    req, _ = request_from_infotext(text)
    assert (req.subseed, req.subseed_strength, req.eta_noise_seed_delta, req.rng) == (40, 0.4, 31337, "NV")
    again = pipe.txt2img(request=req)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    assert not np.array_equal(
        np.asarray(pipe.txt2img("a red circle", sampler="Euler a", **{**options, "rng": "CPU"}).images[0]),
        np.asarray(result.images[0]),
    )
    # an A1111 infotext without an RNG field was made with A1111's default, the GPU source
    assert request_from_infotext("a cat\nSteps: 20, Seed: 1, Size: 512x512")[0].rng == "GPU"


def test_variation_seeds_of_a_batch_share_the_seed_and_count_up_the_subseed(tmp_path):
    """A1111 (processing.py): ``all_seeds = [seed + (x if subseed_strength == 0 else 0) ...]`` and
    ``all_subseeds = [subseed + x ...]``: with variation seeds the batch is variations of one image. Every
    image had seed + i, as without variations, so a batch was not the variations A1111 makes."""
    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    pipe = latentforge.load(path)
    options = dict(seed=9, subseed=40, subseed_strength=0.3, steps=3, sampler="Euler")
    batch = pipe.txt2img("a red circle", batch_size=2, batch_count=2, **options)
    assert batch.seeds == [9, 9, 9, 9]
    for i, (image, text) in enumerate(zip(batch.images, batch.infotexts)):
        assert "Seed: 9," in text and f"Variation seed: {40 + i}," in text, text
        alone = pipe.txt2img("a red circle", **{**options, "subseed": 40 + i})
        assert _diff(image, alone.images[0]) <= 1, i  # a batch of 2 against 1: float order only
        again = pipe.txt2img(request=request_from_infotext(text)[0])  # --from an image of the batch
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(alone.images[0])), i
    assert _diff(batch.images[0], batch.images[1]) > 1  # variations of one image, not the same image
    # the exact record of image 3 names its pass (seed 9, subseed 42) and its place in it
    record = json.loads(batch.images[3].info["latentforge"])
    assert record["batch_index"] == 1 and (record["request"]["seed"], record["request"]["subseed"]) == (9, 42)
    plain = pipe.txt2img("a red circle", batch_size=2, seed=9, steps=3)
    assert plain.seeds == [9, 10]
    record = json.loads(plain.images[1].info["latentforge"])
    assert record["request"]["seed"] == 9 and record["request"]["subseed"] == -1


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
