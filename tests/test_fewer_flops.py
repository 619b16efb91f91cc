"""Fewer FLOPs, as options that change images: DeepCache, token merging (ToMe), lcm/turbo presets.

Independent sources: DeepCache's own helper (the ``DeepCache`` package's ``DeepCacheSDHelper``, which
wraps the blocks of a diffusers UNet) and tomesd (the ToMe for SD authors' package: its bipartite
matching, and ``apply_patch`` on a diffusers UNet as A1111 calls it) on the same tiny weights; the token
count from the paper's formula written here; presets from the settings the task names.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.models.unet import FeatureCache
from latentforge.nn.tome import bipartite_merge
from latentforge.pipelines import GenerationRequest, RequestError
from latentforge.pipelines.fewer_flops import cache_steps
from latentforge.pipelines.metadata import request_from_infotext, unreproduced_fields
from tiny import build_reference, close, hf_tokenizer, save_folder

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def demo():
    return latentforge.load(bundled_model_path())


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    ref = build_reference("sd1", seed=5)
    ours = latentforge.load(save_folder(ref, tmp_path_factory.mktemp("ff") / "m"))
    return ref, ours


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in result.images])


def _inputs(seed: int, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, size, size, generator=g), torch.randn(2, 77, 128, generator=g)


# ----- DeepCache ----------------------------------------------------------------------------------------


def test_deepcache_interval_1_is_the_default_path_exactly(demo):
    base = _pixels(demo.txt2img(PROMPT, seed=3, steps=8))
    for depth in (0, 4, 8):
        same = _pixels(demo.txt2img(PROMPT, seed=3, steps=8, deepcache_interval=1, deepcache_depth=depth))
        assert np.array_equal(base, same), depth
    assert demo.patcher.sources == []  # the hooks are taken back after the request


def test_retrieve_call_equals_the_full_forward_on_the_same_input(sd1):
    _, ours = sd1
    unet = ours.unet
    x, ctx = _inputs(1)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        full = unet(x, t, ctx)
        for depth in range(len(unet.input_blocks)):
            cache = FeatureCache(depth)
            first = unet(x, t, ctx, cache=cache)  # a cache call: the whole UNet, features kept
            assert cache.features is not None and torch.equal(first, full)
            calls: list[int] = []
            handle = unet.middle_block.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            again = unet(x, t, ctx, cache=cache)  # a retrieve call: only the shallow blocks
            handle.remove()
            assert torch.equal(again, full), depth
            assert not calls, "a retrieve call ran the middle block"


def test_deepcache_matches_the_papers_helper_on_diffusers(sd1):
    from DeepCache.extension.deepcache import DeepCacheSDHelper

    ref, ours = sd1
    timesteps = [torch.tensor(t) for t in (900, 700, 500, 300)]
    inputs = [_inputs(10 + i) for i in range(len(timesteps))]
    ctx = inputs[0][1]
    for branch in (0, 1, 2, 3, 7, 11):
        pipe = types.SimpleNamespace(unet=ref.unet, scheduler=types.SimpleNamespace(timesteps=timesteps))
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        helper.enable()
        try:
            with torch.no_grad():
                theirs = [ref.unet(x, t, encoder_hidden_states=ctx).sample for t, (x, _) in zip(timesteps, inputs)]
        finally:
            helper.disable()
        cache = FeatureCache(branch)
        refresh = set(cache_steps(len(timesteps), 3))
        with torch.no_grad():
            for i, (t, (x, _)) in enumerate(zip(timesteps, inputs)):
                if i in refresh:
                    cache.features = None
                mine = ours.unet(x, t.float().expand(2), ctx, cache=cache)
                ok, err, scale = close(mine, theirs[i])
                assert ok, f"branch {branch} step {i}: max diff {err:.3g} (scale {scale:.3g})"


def test_deep_part_runs_on_cache_steps_only(demo):
    calls: list[int] = []
    handle = demo.unet.middle_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        for options, deep_runs in [
            ({}, 10),
            ({"deepcache_interval": 2}, 5),
            ({"deepcache_interval": 3}, 4),
            ({"deepcache_interval": 3, "s_min_uncond": 1000.0, "s_min_uncond_all": True}, 4),  # cond-only calls
            ({"deepcache_interval": 2, "s_min_uncond": 1000.0}, 5),  # batch 2 and 1 in turn: the cond rows
        ]:
            calls.clear()
            demo.txt2img(PROMPT, seed=2, steps=10, sampler="Euler", **options)
            assert len(calls) == deep_runs, (options, len(calls))
    finally:
        handle.remove()


def test_cache_steps_uniform_and_non_uniform():
    assert cache_steps(10, 3) == [0, 3, 6, 9]
    assert cache_steps(5, 1) == [0, 1, 2, 3, 4]
    for steps, interval in ((20, 2), (50, 5), (25, 3), (8, 3)):
        chosen = cache_steps(steps, interval, "non-uniform")
        assert chosen[0] == 0 and len(chosen) == -(-steps // interval) == len(set(chosen))
        assert all(0 <= s < steps for s in chosen)
    gaps = np.diff(cache_steps(50, 5, "non-uniform"))
    assert gaps[len(gaps) // 2] <= gaps[0] and gaps[len(gaps) // 2] <= gaps[-1]  # denser around the middle


def test_deepcache_changes_the_image_and_runs_with_ngms_and_hires(demo):
    base = _pixels(demo.txt2img(PROMPT, seed=4, steps=10))
    cached = _pixels(demo.txt2img(PROMPT, seed=4, steps=10, deepcache_interval=3))
    assert not np.array_equal(base, cached)
    ngms = dict(s_min_uncond=5.0, s_min_uncond_all=False)  # cond-only calls: another batch than the kept features
    a = _pixels(demo.txt2img(PROMPT, seed=4, steps=10, **ngms))
    b = _pixels(demo.txt2img(PROMPT, seed=4, steps=10, deepcache_interval=1, **ngms))
    assert np.array_equal(a, b)
    hr = demo.txt2img(PROMPT, seed=4, steps=6, enable_hr=True, hr_scale=1.5, deepcache_interval=2)
    assert hr.images[0].size == (96, 96)
    with pytest.raises(RequestError, match="deepcache_depth"):
        demo.txt2img(PROMPT, seed=4, steps=2, deepcache_interval=2, deepcache_depth=9)


# ----- token merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.5), (7, 9, 0.3), (6, 10, 0.75), (5, 5, 0.9), (9, 4, 0.1)])
def test_merged_token_count_follows_the_formula(h, w, ratio):
    x = torch.randn(2, h * w, 16)
    merge, unmerge = bipartite_merge(x, h, w, ratio)
    sources = h * w - (h // 2) * (w // 2)  # one destination per whole 2 x 2 region
    assert merge(x).shape == (2, h * w - min(int(h * w * ratio), sources), 16)
    assert unmerge(merge(x)).shape == x.shape


def test_ratio_0_is_identity_and_unmerge_restores_unmerged_tokens():
    x = torch.randn(2, 64, 8)
    merge, unmerge = bipartite_merge(x, 8, 8, 0.0)
    assert merge(x) is x and unmerge(x) is x
    # tokens equal within each 2 x 2 region: every merge averages equal tokens, so nothing changes
    coarse = torch.randn(2, 8, 4, 4)
    x = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2)
    merge, unmerge = bipartite_merge(x, 8, 8, 0.5)
    assert merge(x).shape[1] == 32
    torch.testing.assert_close(unmerge(merge(x)), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rand", [False, True])
def test_bipartite_merge_matches_tomesd(use_rand):
    from tomesd.merge import bipartite_soft_matching_random2d

    h, w, ratio = 10, 12, 0.5
    x = torch.randn(2, h * w, 24)
    f = torch.nn.Linear(24, 24)  # a per-token function between merge and unmerge
    gen = [torch.Generator().manual_seed(7) if use_rand else None for _ in range(2)]
    m1, u1 = bipartite_merge(x, h, w, ratio, generator=gen[0])
    m2, u2 = bipartite_soft_matching_random2d(x, w, h, 2, 2, int(h * w * ratio), no_rand=not use_rand, generator=gen[1])
    with torch.no_grad():
        torch.testing.assert_close(u1(f(m1(x))), u2(f(m2(x))), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u1(m1(x)), u2(m2(x)), rtol=1e-5, atol=1e-5)


def test_token_merging_matches_tomesd_on_a_diffusers_unet(sd1):
    import tomesd

    ref, ours = sd1
    x, ctx = _inputs(3, 16)
    t = torch.tensor([400.0, 400.0])
    from latentforge.pipelines.fewer_flops import FewerFlops, PassFlops

    flops = FewerFlops()
    flops.current = PassFlops(torch.zeros(2), ratio=0.5)
    ours.patcher.add_hook("test", ours.unet, pre=flops.pre_forward, with_kwargs=True)
    ours.patcher.add_token_merge("test", flops.token_merge)
    tomesd.apply_patch(ref.unet, ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    try:
        with torch.no_grad():
            mine, theirs = ours.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample
            ours.patcher.remove("test")
            plain = ours.unet(x, t, ctx)
    finally:
        tomesd.remove_patch(ref.unet)
        ours.patcher.remove("test")
    ok, err, scale = close(mine, theirs)
    assert ok, f"max diff {err:.3g} (scale {scale:.3g})"
    assert not torch.allclose(mine, plain, atol=1e-4)  # merging changed the output


def test_token_merging_in_generation(demo):
    base = _pixels(demo.txt2img(PROMPT, seed=5, steps=4))
    # the hooks installed but the pass's ratio 0 (only a hires ratio, no hires pass): the default exactly
    assert np.array_equal(base, _pixels(demo.txt2img(PROMPT, seed=5, steps=4, token_merging_ratio_hr=0.5)))
    opts = dict(seed=5, steps=4, token_merging_ratio=0.5, token_merging_max_downsample=2)
    merged = _pixels(demo.txt2img(PROMPT, **opts))
    assert not np.array_equal(base, merged)
    rand = dict(opts, token_merging_random=True, batch_size=2)
    assert np.array_equal(_pixels(demo.txt2img(PROMPT, **rand)), _pixels(demo.txt2img(PROMPT, **rand)))
    assert all(getattr(m, "token_merge", None) is None for m in demo.unet.modules())


# ----- presets and the infotext -------------------------------------------------------------------------


def test_presets_set_what_they_say_and_explicit_settings_win():
    lcm = GenerationRequest.from_dict({"preset": "lcm"})
    assert (lcm.sampler, lcm.schedule) == ("LCM", "lcm")
    assert 4 <= lcm.steps <= 8 and 1 <= lcm.cfg_scale <= 2  # LCM-LoRA: 4-8 steps, CFG 1-2
    turbo = GenerationRequest.from_dict({"preset": "turbo"})
    assert (turbo.sampler, turbo.schedule, turbo.cfg_scale) == ("Euler a", "sgm_uniform", 1.0)
    assert 1 <= turbo.steps <= 4
    mine = GenerationRequest.from_dict({"preset": "turbo", "steps": 3, "sampler": "Euler"})
    assert (mine.steps, mine.sampler, mine.cfg_scale) == (3, "Euler", 1.0)
    again = GenerationRequest(steps=30, cfg_scale=9).with_options(preset="lcm", cfg_scale=2.0)
    assert (again.sampler, again.steps, again.cfg_scale) == ("LCM", 4, 2.0)
    assert GenerationRequest.from_dict(lcm.to_dict()) == lcm
    with pytest.raises(RequestError, match="preset"):
        GenerationRequest.from_dict({"preset": "lightning"})


def test_lcm_preset_matches_diffusers_lcm_scheduler_on_the_same_model(sd1, tmp_path):
    import diffusers as D

    ref, ours = sd1
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = D.StableDiffusionPipeline(
        ref.vae, ref.text_encoders[0], hf_tokenizer("<|endoftext|>", tmp_path), ref.unet, D.LCMScheduler(**base),
        None, None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    # LCM-LoRA as diffusers documents it: LCMScheduler, 4 steps, guidance 1-2; the same seed draws the same
    # starting latents and the noise of each step (diffusers starts at unit variance: sgm_noise_multiplier)
    theirs = pipe(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=1.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(77),
        output_type="np",
    ).images
    mine = ours.txt2img(
        PROMPT, negative_prompt="blurry", preset="lcm", width=64, height=64, seed=77, sgm_noise_multiplier=True
    )
    assert (mine.request.steps, mine.request.cfg_scale) == (4, 1.5)
    diff = np.abs(_pixels(mine) / 255.0 - theirs)
    assert diff.max() <= 2 / 255 + 1e-6, f"max pixel diff {diff.max() * 255:.2f}/255"


def test_preset_image_infotext_names_the_settings(demo):
    result = demo.txt2img(PROMPT, seed=6, preset="turbo")
    text = result.infotexts[0]
    assert "Steps: 1," in text and "Sampler: Euler a," in text and "Schedule type: SGM Uniform" in text
    assert "CFG scale: 1," in text and "preset" not in text.lower()


def test_infotext_round_trip_reproduces_the_image(demo):
    opts = dict(
        seed=8,
        steps=6,
        token_merging_ratio=0.4,
        token_merging_random=True,
        token_merging_max_downsample=2,
        deepcache_interval=3,
        deepcache_depth=2,
        deepcache_schedule="non-uniform",
    )
    first = demo.txt2img(PROMPT, **opts)
    req, _ = request_from_infotext(first.infotexts[0])
    assert unreproduced_fields(req) == []
    for key, value in opts.items():
        assert getattr(req, key) == value, key
    again = demo.txt2img(request=req)
    assert np.array_equal(_pixels(first), _pixels(again))


def test_a1111_token_merging_fields_are_read():
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Token merging ratio: 0.5, "
        "Token merging ratio hr: 0.3, Hires upscale: 2, Denoising strength: 0.5"
    )
    req, _ = request_from_infotext(text)
    assert (req.token_merging_ratio, req.token_merging_ratio_hr) == (0.5, 0.3)
    assert unreproduced_fields(req) == []
    req.validate()


def test_bad_values_are_refused_by_name():
    for field, value in [
        ("token_merging_ratio", 1.5),
        ("token_merging_ratio_hr", -0.1),
        ("token_merging_max_downsample", 3),
        ("deepcache_interval", -1),
        ("deepcache_schedule", "sometimes"),
        ("token_merging_random", "yes"),
    ]:
        with pytest.raises(RequestError, match=field):
            GenerationRequest.from_dict({field: value}).validate()


def test_command_line_options_and_from(tmp_path):
    from PIL import Image

    from latentforge.cli import main

    out, again = tmp_path / "a.png", tmp_path / "b.png"
    args = ["--preset", "turbo", "--steps", "2", "--deepcache", "2", "--tome", "0.3"]
    args += ["--token-merging-max-downsample", "2", "--token-merging-random", "--seed", "3", "-q"]
    assert main(["txt2img", PROMPT, *args, "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    for field in ("Steps: 2,", "Sampler: Euler a,", "CFG scale: 1,", "DeepCache interval: 2"):
        assert field in text
    assert "Token merging ratio: 0.3" in text and "Token merging random: True" in text
    assert main(["txt2img", "--from", str(out), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_batched_server_jobs_leave_these_requests_alone():
    from latentforge.pipelines.batch import batch_key

    assert batch_key(GenerationRequest(prompt="a")) is not None
    for options in ({"deepcache_interval": 2}, {"token_merging_ratio": 0.3}, {"token_merging_ratio_hr": 0.3}):
        assert batch_key(GenerationRequest(prompt="a", **options)) is None
