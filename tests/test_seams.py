"""The seams the next features plug into: the patcher (weight patches with exact restore, hooks, compile
and offload), ControlNet residuals in the UNet, extra token embeddings in CLIP, the attention context
hook, family conditioners shared by generation and training, and nothing set on a pipeline from outside."""

from __future__ import annotations

import pytest
import torch

import latentforge
from latentforge.models.unet import ControlResiduals
from latentforge.pipelines import RequestError
from latentforge.pipelines.plan import conditioning
from tiny import build_reference, close, save_folder


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    reference = build_reference("sd1", seed=500)
    path = save_folder(reference, tmp_path_factory.mktemp("seams") / "sd1")
    return reference, path


@pytest.fixture
def pipe(ref):
    return latentforge.load(ref[1], dtype="fp32")


def _inputs(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size, size, generator=g)
    ctx = torch.randn(1, 77, 128, generator=g)
    return x, torch.tensor([500.0]), ctx


def _skip_shapes(unet, x, t, ctx) -> list[torch.Size]:
    shapes = []
    handles = [b.register_forward_hook(lambda m, a, out: shapes.append(out.shape)) for b in unet.input_blocks]
    unet(x, t, ctx)
    for h in handles:
        h.remove()
    return shapes


@torch.no_grad()
def test_controlnet_residuals_match_diffusers(ref, pipe):
    """ControlNet's residuals (one per skip connection, one after the middle block) against diffusers'
    ``down_block_additional_residuals`` / ``mid_block_additional_residual`` on the same weights."""
    reference, _ = ref
    x, t, ctx = _inputs()
    shapes = _skip_shapes(pipe.unet, x, t, ctx)
    g = torch.Generator().manual_seed(1)
    skips = [torch.randn(s, generator=g) * 0.5 for s in shapes]
    mid_shape = []
    h = pipe.unet.middle_block.register_forward_hook(lambda m, a, out: mid_shape.append(out.shape))
    pipe.unet(x, t, ctx)
    h.remove()
    middle = torch.randn(mid_shape[0], generator=g) * 0.5
    ours = pipe.unet(x, t, ctx, control=ControlResiduals(output=skips, middle=middle))
    theirs = reference.unet(
        x, t, ctx, down_block_additional_residuals=tuple(skips), mid_block_additional_residual=middle
    ).sample
    plain = pipe.unet(x, t, ctx)
    ok, diff, scale = close(ours, theirs)
    assert ok, (diff, scale)
    assert (ours - plain).abs().max() > 100 * diff  # the residuals changed the output


@torch.no_grad()
def test_input_residuals_equal_adding_to_the_input_block_outputs(pipe):
    x, t, ctx = _inputs(2)
    shapes = _skip_shapes(pipe.unet, x, t, ctx)
    r = torch.randn(shapes[4], generator=torch.Generator().manual_seed(3))
    ours = pipe.unet(x, t, ctx, control=ControlResiduals(input=[None] * 4 + [r]))
    hook = pipe.unet.input_blocks[4].register_forward_hook(lambda m, a, out: out + r)
    expected = pipe.unet(x, t, ctx)
    hook.remove()
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert not torch.equal(ours, pipe.unet(x, t, ctx))


@torch.no_grad()
def test_weight_patches_compose_and_restore_exactly(pipe):
    x, t, ctx = _inputs(4)
    before = pipe.unet(x, t, ctx)
    name = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    original = pipe.unet.get_parameter(name.removeprefix("unet.")).detach().clone()
    pipe.patcher.patch("a", {name: lambda w: w + 0.5})
    pipe.patcher.patch("b", {name: lambda w: w * 3})
    weight = pipe.unet.get_parameter(name.removeprefix("unet."))
    torch.testing.assert_close(weight, (original + 0.5) * 3, rtol=0, atol=0)
    assert pipe.patcher.sources == ["a", "b"] and pipe.patcher.patched() == [name]
    assert not torch.equal(pipe.unet(x, t, ctx), before)
    pipe.patcher.remove("a")  # recomputed from the backup, not undone arithmetically
    torch.testing.assert_close(weight, original * 3, rtol=0, atol=0)
    pipe.patcher.remove("b")
    assert torch.equal(weight, original) and pipe.patcher.patched() == []
    assert torch.equal(pipe.unet(x, t, ctx), before)


def test_batched_patches_run_each_function_once_and_compose_as_unbatched(pipe):
    """Each patch() recomputed its weight from the backup through every source: N sources on one weight ran
    N(N+1)/2 patch functions (a prompt of 150 LoRA tags: 4 minutes); inside batched() each runs once."""
    name = "unet.out.2.weight"
    weight = pipe.unet.get_parameter("out.2.weight")
    original = weight.detach().clone()
    calls = []

    def step(i):
        def fn(w):
            calls.append(i)
            return w * 1.01 + i * 1e-3

        return fn

    expected = original.float()
    for i in range(40):
        expected = expected * 1.01 + i * 1e-3
    with pipe.patcher.batched():
        for i in range(40):
            pipe.patcher.patch(f"s{i}", {name: step(i)})
    assert calls == list(range(40))  # once each, in order
    assert torch.equal(weight, expected.to(weight.dtype))
    calls.clear()
    with pipe.patcher.batched():
        for i in range(40):
            pipe.patcher.remove(f"s{i}")
    assert calls == [] and torch.equal(weight, original) and pipe.patcher.patched() == []


def test_unknown_patch_targets_change_nothing(pipe):
    good = "unet.out.2.weight"
    original = pipe.unet.get_parameter("out.2.weight").detach().clone()
    with pytest.raises(KeyError, match="has no parameter"):
        pipe.patcher.patch("bad", {good: lambda w: w * 0, "unet.no.such.weight": lambda w: w})
    with pytest.raises(KeyError, match="no network"):
        pipe.patcher.patch("bad", {"controlnet.x": lambda w: w})
    assert torch.equal(pipe.unet.get_parameter("out.2.weight"), original) and pipe.patcher.sources == []


@torch.no_grad()
def test_patches_on_a_bf16_model_restore_the_loaded_bits(ref):
    pipe = latentforge.load(ref[1], dtype="bf16")
    name = "unet.middle_block.1.proj_in.weight"
    original = pipe.unet.get_parameter(name[5:]).detach().clone()
    pipe.patcher.patch("lora", {name: lambda w: w + 1e-3})
    pipe.patcher.remove("lora")
    assert torch.equal(pipe.unet.get_parameter(name[5:]), original)


@torch.no_grad()
def test_context_hook_on_cross_attention_equals_a_scaled_context(pipe):
    """A hook giving keys and values 2x the context, on the cross-attention layers only, is the same
    network as the unhooked one run on 2x the context (self-attention never sees the context)."""
    x, t, ctx = _inputs(5)
    expected = pipe.unet(x, t, 2 * ctx)
    count = pipe.patcher.add_context_hook("hyper", lambda m, k, v: (2 * k, 2 * v), lambda n, m: n.endswith("attn2"))
    assert count == sum(n.endswith("attn2") for n, _ in pipe.unet.named_modules())
    torch.testing.assert_close(pipe.unet(x, t, ctx), expected)
    pipe.patcher.remove("hyper")
    assert all(getattr(m, "context_hook", None) is None for m in pipe.unet.modules())
    torch.testing.assert_close(pipe.unet(x, t, ctx), pipe.unet(x, t, ctx))
    assert not torch.allclose(pipe.unet(x, t, ctx), expected)


@torch.no_grad()
def test_compiled_unet_sees_hooks_added_after_compiling(pipe, ref):
    x, t, ctx = _inputs(6)
    plain = pipe.unet(x, t, ctx)
    pipe.compile(backend="eager")
    torch.testing.assert_close(pipe.unet(x, t, ctx), plain)
    pipe.patcher.add_context_hook("hyper", lambda m, k, v: (k, 0.5 * v), lambda n, m: n.endswith("attn2"))
    hooked = pipe.unet(x, t, ctx)
    other = latentforge.load(ref[1], dtype="fp32")  # the same hook without compile
    other.patcher.add_context_hook("hyper", lambda m, k, v: (k, 0.5 * v), lambda n, m: n.endswith("attn2"))
    torch.testing.assert_close(hooked, other.unet(x, t, ctx))
    assert not torch.allclose(hooked, plain)
    pipe.patcher.remove("hyper")
    torch.testing.assert_close(pipe.unet(x, t, ctx), plain)


def test_cuda_graph_modes_copy_the_output_out_of_the_graph(pipe, monkeypatch):
    """A CUDA graph replay writes its output into the same memory on every call; with the modes that replay
    graphs the compiled UNet hands out copies, so a sampler's earlier results survive the next call."""
    replays = torch.zeros(3)

    def graph_like_compile(fn, **options):
        def replay(*args, **kwargs):
            replays.add_(1)
            return replays

        return replay

    monkeypatch.setattr(torch, "compile", graph_like_compile)
    x, t, ctx = _inputs(8)
    for options in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"options": {"triton.cudagraphs": True}}):
        pipe.compile(**options)
        first, second = pipe.unet(x, t, ctx), pipe.unet(x, t, ctx)
        assert second.tolist() == [first[0].item() + 1] * 3 and first is not replays and second is not replays
    for options in (
        {},
        {"mode": "max-autotune-no-cudagraphs"},
        {"mode": "reduce-overhead", "options": {"triton.cudagraphs": False}},
    ):
        pipe.compile(**options)
        assert pipe.unet(x, t, ctx) is replays  # no copy where no graph is replayed


@torch.no_grad()
def test_offload_hooks_live_in_the_patcher_and_patches_survive_offload(ref):
    x, t, ctx = _inputs(7)
    plain = latentforge.load(ref[1], dtype="fp32")
    plain.patcher.patch("p", {"unet.out.2.bias": lambda w: w + 0.25})
    expected = plain.unet(x, t, ctx)
    pipe = latentforge.load(ref[1], dtype="fp32")
    offloader = pipe.enable_offload("cpu", sequential=True)
    pipe.patcher.patch("p", {"unet.out.2.bias": lambda w: w + 0.25})
    assert "offload" in pipe.patcher.sources
    torch.testing.assert_close(pipe.unet(x, t, ctx), expected, rtol=0, atol=0)
    assert offloader.moves > 0
    offloader.remove()
    assert "offload" not in pipe.patcher.sources


@torch.no_grad()
def test_extra_token_embeddings_act_as_vocabulary_rows(pipe):
    enc = pipe.text_encoders[0]
    tok = pipe.tokenizers[0]
    ids = torch.tensor([tok.frame(tok.encode("a red cube on a table"))])
    vocab = enc.config.vocab_size
    picked = ids[0, 2:4].clone()
    extra = enc.embeddings.token_embedding.weight[picked].clone()
    swapped = ids.clone()
    swapped[0, 2:4] = torch.tensor([vocab, vocab + 1])
    torch.testing.assert_close(enc(swapped, extra=extra).hidden, enc(ids).hidden, rtol=0, atol=0)
    other = enc(swapped, extra=extra + 1).hidden
    assert not torch.allclose(other, enc(ids).hidden)


@pytest.mark.parametrize("family", ["sdxl-base", "sdxl-refiner"])
def test_training_and_generation_condition_the_same_way(family, tmp_path):
    from latentforge.train.diffusion import encode_captions

    pipe = latentforge.load(save_folder(build_reference(family, seed=7), tmp_path / family), dtype="fp32")
    with torch.no_grad():
        trained = encode_captions(pipe, ["a cube"], 64)
    req = latentforge.pipelines.GenerationRequest(prompt="a cube", prompt_syntax="plain", aesthetic_score=6.0)
    generated = conditioning(pipe, req, 64, 64, 1)[0].at(0)
    torch.testing.assert_close(trained.context, generated.context, rtol=0, atol=0)
    torch.testing.assert_close(trained.vector, generated.vector, rtol=0, atol=0)
    numbers = pipe.family.conditioner.size_numbers(64, 64, 6.0)
    assert numbers == ([64, 64, 0, 0, 64, 64] if family == "sdxl-base" else [64, 64, 0, 0, 6.0])


def test_models_that_need_their_own_input_are_refused_clearly(tmp_path):
    pipe = latentforge.load(save_folder(build_reference("sd2-depth", seed=3), tmp_path / "depth"))
    with pytest.raises(RequestError, match="need their own input \\(a depth map\\)"):
        pipe.txt2img("a cube", steps=2, width=64, height=64)


def test_generation_sets_nothing_on_the_pipeline_from_outside(pipe):
    before = set(vars(pipe))
    result = pipe.txt2img("a cube", steps=2, width=64, height=64, seed=1, progress=lambda p: p.preview())
    assert set(vars(pipe)) == before
    assert set(pipe.caches) == {"infotext model fields", "preview weights", "unet_params"} and result.images
