"""ComfyUI's whole-batch noise ("comfy batch"), checked against torch's generators and torchsde used here
as ComfyUI's code is described (comfy/sample.py ``prepare_noise``: ``torch.manual_seed(seed)`` on the CPU,
one ``torch.randn`` of the batch's shape; comfy/k_diffusion/sampling.py ``default_noise_sampler``: a
generator on the latents' device seeded with seed, plus 1 on the CPU; ``BrownianTreeNoiseSampler`` with
one seed: one tree over the batch's shape), and that --from a ComfyUI graph with a batch of 2 starts
both images from that noise."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from comfygraph import comfy_png, comfy_txt2img
from latentforge.cli import main
from latentforge.demo import bundled_model_path
from latentforge.pipelines.metadata import request_from_image
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling.noise import BrownianNoise, ImageNoise, NoiseOptions

generate_module = importlib.import_module("latentforge.pipelines.generate")  # the package exports a function
COMFY = NoiseOptions(source="comfy batch")
SHAPE = (4, 8, 8)


def test_first_draw_is_one_randn_of_the_whole_batch_from_manual_seed():
    seed = 1234
    with torch.random.fork_rng():
        expected = torch.randn((3, *SHAPE), generator=torch.manual_seed(seed), device="cpu")
    got = ImageNoise([seed, seed + 1, seed + 2], SHAPE, options=COMFY).next()
    assert torch.equal(got, expected)
    # A1111's convention differs from the second image on: image i has its own generator seeded seed + i
    a1111 = ImageNoise([seed, seed + 1, seed + 2], SHAPE).next()
    assert torch.equal(a1111[0], expected[0]) and not torch.equal(a1111[1], expected[1])
    assert torch.equal(a1111[1], torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)))


def test_later_draws_come_from_a_cpu_generator_seeded_with_seed_plus_one():
    seed = 77
    noise = ImageNoise([seed, seed + 1], SHAPE, options=COMFY)
    noise.next()
    later = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        assert torch.equal(noise(1.0, 0.5), torch.randn((2, *SHAPE), generator=later))


@pytest.mark.parametrize("seed", [2**63, 2**64 - 2, 2**64 - 1])
def test_seeds_up_to_2_to_the_64_as_comfyui_draws_them(seed):
    """ComfyUI's seed widget goes to 0xffffffffffffffff; its seeds pass straight to torch.manual_seed. Its
    later draws on the CPU use seed + 1, which for the largest seed is past torch's range: latentforge
    wraps it to 0 (ComfyUI itself stops there with an overflow error)."""
    with torch.random.fork_rng():
        expected = torch.randn((2, *SHAPE), generator=torch.manual_seed(seed), device="cpu")
    noise = ImageNoise([seed, seed], SHAPE, options=COMFY)
    assert torch.equal(noise.next(), expected)
    later = torch.Generator().manual_seed((seed + 1) % 2**64)
    assert torch.equal(noise(1.0, 0.5), torch.randn((2, *SHAPE), generator=later))
    GenerationRequest(prompt="x", rng="comfy batch", seed=seed).validate()


def test_the_last_image_of_a_run_must_have_a_seed_below_2_to_the_64():
    GenerationRequest(prompt="x", seed=2**64 - 4, batch_size=2, batch_count=2).validate()
    with pytest.raises(RequestError, match=r"last image would use seed 18446744073709551612 \+ 4, above 2\^64 - 1"):
        GenerationRequest(prompt="x", seed=2**64 - 4, batch_size=5).validate()
    with pytest.raises(RequestError, match=r"subseed .* above 2\^64 - 1"):
        GenerationRequest(prompt="x", subseed=2**64 - 1, batch_count=2, subseed_strength=0.5).validate()
    for bad in (2**64, -2):
        with pytest.raises(RequestError, match="seed must be -1 \\(random\\) or a whole number from 0 to 2\\^64 - 1"):
            GenerationRequest(prompt="x", seed=bad).validate()


def test_a1111_per_image_settings_are_refused_with_comfy_batch():
    for options in (
        NoiseOptions(source="comfy batch", subseed_strength=0.5),
        NoiseOptions(source="comfy batch", seed_resize_from=(32, 32)),
        NoiseOptions(source="comfy batch", eta_noise_seed_delta=31337),
    ):
        with pytest.raises(ValueError, match="comfy batch"):
            ImageNoise([1], SHAPE, subseeds=[2], options=options)
    with pytest.raises(RequestError, match="subseed_strength"):
        GenerationRequest(prompt="x", rng="comfy batch", subseed_strength=0.3).validate()
    with pytest.raises(RequestError, match="eta_noise_seed_delta"):
        GenerationRequest(prompt="x", rng="comfy batch", eta_noise_seed_delta=1).validate()
    GenerationRequest(prompt="x", rng="comfy batch").validate()


def test_brownian_noise_of_the_whole_batch_is_one_tree_seeded_with_the_seed():
    torchsde = pytest.importorskip("torchsde")
    seed, lo, hi = 99, 0.03, 14.6
    t0, t1 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    tree = torchsde.BrownianTree(t0, torch.zeros((2, *SHAPE)), t1, entropy=seed)
    ours = BrownianNoise([seed, seed + 1], SHAPE, lo, hi, whole_batch=True)
    for a, b in ((14.6, 10.0), (10.0, 3.0), (3.0, 0.03)):
        ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        expected = -tree(tb, ta) / (ta - tb).sqrt()  # sigma decreases: W(b) - W(a) = -(W(a) - W(b))
        torch.testing.assert_close(ours(a, b), expected, rtol=0, atol=1e-6)


def _graph(batch: int) -> dict:
    return comfy_txt2img(
        ckpt="demo.safetensors",
        positive="a red circle on a blue background",
        negative="",
        seed=4242,
        steps=3,
        cfg=3.0,
        width=64,
        height=64,
        batch=batch,
    )


def _comfy_png(path, graph: dict):
    return comfy_png(path, graph, size=(64, 64))


def test_comfy_graph_asks_for_whole_batch_noise(tmp_path):
    req, meta = request_from_image(_comfy_png(tmp_path / "one.png", _graph(1)))
    assert req.rng == "comfy batch" and meta["batch_index"] == 0
    req, meta = request_from_image(_comfy_png(tmp_path / "two.png", _graph(2)))
    assert req.rng == "comfy batch" and req.batch_size == 2
    assert meta["batch_index"] is None  # ComfyUI does not record which image of the batch a file is


def test_from_a_comfy_graph_with_two_images_starts_both_from_comfys_noise(tmp_path, monkeypatch):
    model = bundled_model_path()
    if model is None:
        pytest.skip("no bundled demo model")
    starts = []
    original = generate_module.starting_latent

    def spy(p, init, first_noise):
        x = original(p, init, first_noise)
        starts.append((float(p.sigmas[0]), x.clone()))
        return x

    monkeypatch.setattr(generate_module, "starting_latent", spy)
    source = _comfy_png(tmp_path / "comfy.png", _graph(2))
    out = tmp_path / "again.png"
    assert main(["txt2img", "--from", str(source), "-m", str(model), "-q", "-o", str(out)]) == 0
    (sigma, x) = starts[0]
    with torch.random.fork_rng():
        noise = torch.randn((2, *x.shape[1:]), generator=torch.manual_seed(4242), device="cpu")
    torch.testing.assert_close(x, noise * math.sqrt(1 + sigma**2), rtol=1e-6, atol=1e-6)  # ComfyUI's start scaling
    written = sorted(p.name for p in tmp_path.glob("again*.png"))
    assert len(written) == 2, written  # both images of the batch, since ComfyUI records no index
