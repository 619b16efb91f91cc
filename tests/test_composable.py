"""A1111's composable prompts (``AND``, Liu et al. 2022): parsing and the guidance formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentforge
from latentforge.conditioning.prompt import split_and
from latentforge.sampling import CFGDenoiser, Cond, ModelDenoiser, NoiseSchedule
from tiny import build_reference, save_folder


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # A1111's documented example for composable diffusion
        ("a cat :1.2 AND a dog AND a penguin :2.2", [("a cat", 1.2), (" a dog", 1.0), (" a penguin", 2.2)]),
        ("a (red:1.3) car", [("a (red:1.3) car", 1.0)]),
        ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),
        ("x :-0.5", [("x", -0.5)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return latentforge.load(save_folder(build_reference("sd1", seed=8), tmp_path_factory.mktemp("and") / "m"))


@torch.no_grad()
def test_guidance_sums_the_weighted_differences(pipe):
    model = ModelDenoiser(pipe.unet, NoiseSchedule(), "eps")
    a, b, u = (Cond(pipe.encode_prompt(t).context) for t in ("a cat", "a dog", ""))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0])
    da, db, du = model(x, sigma, a), model(x, sigma, b), model(x, sigma, u)
    expected = du + 7.0 * (1.2 * (da - du) + 0.8 * (db - du))
    # batched together vs one by one: float summation order only
    torch.testing.assert_close(
        CFGDenoiser(model, [(1.2, a), (0.8, b)], u, 7.0)(x, sigma), expected, rtol=1e-4, atol=1e-3
    )


def test_generation_with_and(pipe):
    opts = dict(steps=4, seed=3, width=64, height=64)
    both = pipe.txt2img("a cat :1.2 AND a dog :0.8", **opts).images[0]
    one = pipe.txt2img("a cat", **opts).images[0]
    assert not np.array_equal(np.asarray(both), np.asarray(one))
    # a single part of weight 1 is the plain prompt (A1111 drops the trailing white space)
    assert np.array_equal(np.asarray(pipe.txt2img("a cat :1", **opts).images[0]), np.asarray(one))
    assert pipe.txt2img("a cat AND a dog", cfg_scale=1.0, **opts).images


@torch.no_grad()
def test_ngms_skips_the_unconditional_side_on_every_other_call_below_the_sigma(pipe):
    """A1111's "Negative Guidance minimum sigma": below s_min_uncond, odd calls (every call with
    s_min_uncond_all) return the conditional estimate; above it, and on even calls, ordinary CFG."""
    model = ModelDenoiser(pipe.unet, NoiseSchedule(), "eps")
    c, u = Cond(pipe.encode_prompt("a cat").context), Cond(pipe.encode_prompt("").context)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    low, high = torch.tensor([0.5]), torch.tensor([5.0])
    plain = CFGDenoiser(model, c, u, 7.0)
    guided_low = plain(x, low)
    cond_only = model(x, low, c)
    d = CFGDenoiser(model, c, u, 7.0, min_uncond_sigma=1.0)
    torch.testing.assert_close(d(x, low), guided_low)  # call 0: even
    torch.testing.assert_close(d(x, low), cond_only)  # call 1: skipped
    assert not torch.allclose(d(x, high), model(x, high, c))  # above the sigma: guided
    every = CFGDenoiser(model, c, u, 7.0, min_uncond_sigma=1.0, min_uncond_all=True)
    torch.testing.assert_close(every(x, low), cond_only)
