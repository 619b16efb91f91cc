"""MiDaS DPT-Hybrid: parity with transformers' DPTForDepthEstimation (is_hybrid, BiT backbone) on a tiny
random configuration, loaded from a transformers folder, a diffusers depth2img folder and the original
MiDaS key layout (written here from the layout's description, independently of our loader's table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latentforge.io.tensorfile import CheckpointError
from latentforge.models.midas import DPTHybrid, MidasConfig, estimate_depth, midas_input_size, sd2_depth_condition
from latentforge.models.midas_load import (
    MIDAS_FILE,
    MidasNotFoundError,
    config_from_original,
    config_from_transformers,
    find_midas,
    load_midas,
    transformers_name,
)

transformers = pytest.importorskip("transformers")

SIZE = 64  # tiny image size: a 4 x 4 token grid


def _tiny_hf():
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(
        is_hybrid=True,
        hidden_size=128,  # 2 heads of 64, the width the original layout implies
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=256,
        layer_norm_eps=1e-6,  # timm's value, which the original layout implies
        image_size=SIZE,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],  # blocks 2 and 3 feed the last two maps (3/4 depth and last)
        neck_hidden_sizes=[128, 256, 96, 96],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=32,
        readout_type="project",
        backbone_featmap_shape=[1, 256, SIZE // 16, SIZE // 16],
        backbone_config=dict(
            model_type="bit",
            layer_type="bottleneck",
            global_padding="same",
            embedding_dynamic_padding=True,
            embedding_size=32,
            hidden_sizes=[128, 256, 256],  # bottlenecks 32, 64, 64: 32 groups, as the original implies
            depths=[1, 2, 1],
            num_groups=32,
            out_features=["stage1", "stage2", "stage3"],
        ),
    )
    torch.manual_seed(0)
    model = DPTForDepthEstimation(cfg).eval()
    with torch.no_grad():
        # transformers initialises with std 0.02, which leaves the output nearly constant: draw every
        # weight again at unit gain so that each layer's mistakes would show in the output
        for name, p in model.named_parameters():
            if "cls_token" in name or "position_embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
        model.head.head[4].bias.fill_(0.5)  # most of the final ReLU's output positive
    return model


# The original layout, written from its description (MiDaS' DPT with timm's vit_base_resnet50_384):
# pretrained.model = the timm ViT (patch_embed.backbone = timm ResNetV2: stem.conv/norm, stages.S.blocks.B;
# patch_embed.proj; cls_token; pos_embed; blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2};
# norm; head = ImageNet classifier), pretrained.act_postprocess{3,4} = Sequential(ProjectReadout(project =
# Sequential(Linear, GELU)), Transpose, Unflatten, Conv1x1[, Conv3x3 s2]), scratch.layer{1..4}_rn,
# scratch.refinenet{1..4} = FeatureFusionBlock(resConfUnit1/2.conv1/conv2, out_conv), scratch.output_conv =
# Sequential(conv, interpolate, conv, relu, conv, relu). Transformers' fusion layer i is refinenet(4 - i).
_TO_ORIGINAL = [
    (r"^dpt\.embeddings\.backbone\.bit\.embedder\.convolution\.", "pretrained.model.patch_embed.backbone.stem.conv."),
    (r"^dpt\.embeddings\.backbone\.bit\.embedder\.norm\.", "pretrained.model.patch_embed.backbone.stem.norm."),
    (
        r"^dpt\.embeddings\.backbone\.bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.",
        r"pretrained.model.patch_embed.backbone.stages.\1.blocks.\2.",
    ),
    (r"^dpt\.embeddings\.projection\.", "pretrained.model.patch_embed.proj."),
    (r"^dpt\.embeddings\.cls_token$", "pretrained.model.cls_token"),
    (r"^dpt\.embeddings\.position_embeddings$", "pretrained.model.pos_embed"),
    (r"^dpt\.encoder\.layer\.(\d+)\.layernorm_before\.", r"pretrained.model.blocks.\1.norm1."),
    (r"^dpt\.encoder\.layer\.(\d+)\.layernorm_after\.", r"pretrained.model.blocks.\1.norm2."),
    (r"^dpt\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"pretrained.model.blocks.\1.attn.proj."),
    (r"^dpt\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"pretrained.model.blocks.\1.mlp.fc1."),
    (r"^dpt\.encoder\.layer\.(\d+)\.output\.dense\.", r"pretrained.model.blocks.\1.mlp.fc2."),
    (r"^dpt\.layernorm\.", "pretrained.model.norm."),
    (
        r"^neck\.reassemble_stage\.readout_projects\.(\d)\.0\.",
        lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.0.project.0.",
    ),
    (r"^neck\.reassemble_stage\.layers\.(\d)\.projection\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.3."),
    (r"^neck\.reassemble_stage\.layers\.(\d)\.resize\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.4."),
    (r"^neck\.convs\.(\d)\.", lambda m: f"scratch.layer{int(m[1]) + 1}_rn."),
    (r"^neck\.fusion_stage\.layers\.(\d)\.", lambda m: f"scratch.refinenet{4 - int(m[1])}."),
    (r"\.projection\.", ".out_conv."),  # the fusion block's 1x1 (after the line above)
    (r"\.residual_layer(\d)\.convolution(\d)\.", r".resConfUnit\1.conv\2."),
    (r"^head\.head\.", "scratch.output_conv."),
]


def write_original(hf_state: dict[str, torch.Tensor], path: Path, hidden: int) -> dict[str, torch.Tensor]:
    """Test-only writer: a transformers state dict -> the original MiDaS file (torch.save of a plain dict)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in hf_state.items():
        if m := re.fullmatch(
            r"dpt\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", key
        ):
            qkv.setdefault(f"pretrained.model.blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = t
            continue
        name = key
        for pattern, repl in _TO_ORIGINAL:
            if not name.startswith("scratch.refinenet") and pattern == r"\.projection\.":
                continue
            name = re.sub(pattern, repl, name)
        assert name.startswith(("pretrained.", "scratch.")), f"unmapped {key} -> {name}"
        out[name] = t.clone()
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    out["pretrained.model.head.weight"] = torch.randn(1000, hidden)  # the ViT's classifier, unused
    out["pretrained.model.head.bias"] = torch.zeros(1000)
    torch.save(out, path)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("midas")
    hf = _tiny_hf()
    folder = root / "dpt-hybrid"
    hf.save_pretrained(folder)
    sd2 = root / "sd2-depth"
    (sd2 / "depth_estimator").mkdir(parents=True)
    for f in folder.iterdir():
        (sd2 / "depth_estimator" / f.name).write_bytes(f.read_bytes())
    original = root / MIDAS_FILE
    orig_state = write_original(hf.state_dict(), original, hf.config.hidden_size)
    torch.manual_seed(1)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = hf(pixel_values=(images - 0.5) / 0.5).predicted_depth
    return dict(
        hf=hf, folder=folder, sd2=sd2, original=original, orig_state=orig_state, images=images, ref=ref, root=root
    )


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert ref.std() > 0.05 * scale and (ref > 0).float().mean() > 0.3, "the reference output is degenerate"
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max error {err} vs output scale {scale}"


@pytest.mark.parametrize("which", ["folder", "sd2", "original"])
def test_depth_matches_transformers(tiny, which):
    model = load_midas(tiny[which])
    with torch.no_grad():
        ours = model((tiny["images"] - 0.5) / 0.5)
    _close(ours, tiny["ref"])


def test_original_layout_names(tiny):
    keys = set(tiny["orig_state"])
    for k in (
        "pretrained.model.patch_embed.backbone.stem.conv.weight",
        "pretrained.model.patch_embed.backbone.stages.1.blocks.0.downsample.conv.weight",
        "pretrained.model.blocks.3.attn.qkv.weight",
        "pretrained.act_postprocess4.4.weight",
        "scratch.refinenet4.resConfUnit1.conv1.weight",
        "scratch.output_conv.4.bias",
    ):
        assert k in keys
    model = load_midas(tiny["original"])
    assert set(model.state_dict()) == keys - {"pretrained.model.head.weight", "pretrained.model.head.bias"}


def test_estimate_depth_normalises_and_keeps_size(tiny):
    model = load_midas(tiny["folder"])
    depth = estimate_depth(model, tiny["images"], size=(SIZE, SIZE))
    _close(depth[:, 0], tiny["ref"])
    # another size: resized bicubically to the network size, output upsampled back to that size
    big = F.interpolate(tiny["images"], size=(80, 112), mode="bilinear", align_corners=False).clamp(0, 1)
    out = estimate_depth(model, big, size=(64, 96))
    assert out.shape == (2, 1, 64, 96) and torch.isfinite(out).all()


def test_midas_input_size_follows_the_minimal_resize():
    # scale by whichever of 384/h, 384/w is nearer 1, then the nearest multiple of 32 (halves to even)
    assert midas_input_size(512, 512) == (384, 384)
    assert midas_input_size(512, 768) == (384, 576)  # 0.75 is nearer 1 than 0.5
    assert midas_input_size(300, 500) == (224, 384)  # 0.768: 230.4 -> 224
    assert midas_input_size(336, 384) == (320, 384)  # scale 1: 336 / 32 = 10.5 -> 10
    assert midas_input_size(400, 1000) == (384, 960)  # 0.96 beats 0.384: 960 exactly


def test_sd2_depth_condition_is_min_max_to_minus_one_one():
    d = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    out = sd2_depth_condition(torch.cat([d, 2 * d + 5]), (2, 2))
    torch.testing.assert_close(out[0:1], 2 * d / 3 - 1)  # A1111 and diffusers: no eps
    torch.testing.assert_close(out[1:2], 2 * d / 3 - 1)  # each image on its own
    torch.testing.assert_close(sd2_depth_condition(d, (2, 2), eps=1e-3), 2 * d / (3 + 1e-3) - 1)  # original
    assert (sd2_depth_condition(torch.ones(1, 1, 4, 4), (2, 2)) == -1).all()
    # resized bicubically before the min-max: 8 -> 4 samples the ramp 0..7 at 0.5, 2.5, 4.5, 6.5 (half-pixel
    # centres); the cubic kernel (a = -0.75) at offset 1/2 weighs the 4 taps -3/32, 19/32, 19/32, -3/32, exact
    # on a line inside, edge pixels repeated outside: 0.5 -> 19/32 - 6/32 = 13/32, 6.5 -> 7 - 13/32
    ramp = torch.arange(8.0).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)
    lo, hi = 13 / 32, 7 - 13 / 32
    expected = torch.tensor([lo, 2.5, 4.5, hi])
    out = sd2_depth_condition(ramp, (4, 4))
    torch.testing.assert_close(out[0, 0, 0], 2 * (expected - lo) / (hi - lo) - 1)


def test_missing_file_says_what_to_get_and_where(tmp_path, caplog):
    """What to get and where it goes, in words; the folders of this machine only in the log (the server
    passes the message to its clients)."""
    webui = tmp_path / "webui" / "models"
    ckpt = webui / "Stable-diffusion" / "512-depth-ema.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with caplog.at_level("INFO", logger="latentforge.models.annotator_files"), pytest.raises(MidasNotFoundError) as e:
        find_midas(ckpt)
    msg = str(e.value)
    assert MIDAS_FILE in msg and "models/midas" in msg and "github.com/intel-isl/DPT" in msg
    assert str(tmp_path) not in msg and str(webui / "midas" / MIDAS_FILE) in caplog.text
    (webui / "midas").mkdir()
    (webui / "midas" / MIDAS_FILE).write_bytes(b"x")
    assert find_midas(ckpt) == webui / "midas" / MIDAS_FILE
    with pytest.raises(MidasNotFoundError, match=MIDAS_FILE):
        load_midas(tmp_path / "nothing.pt")


def test_finds_a_diffusers_depth_estimator(tiny):
    assert find_midas(tiny["sd2"]) == tiny["sd2"] / "depth_estimator"
    # the weights file of a transformers folder, given directly, finds its config.json beside it
    model = load_midas(tiny["sd2"] / "depth_estimator" / "model.safetensors")
    assert model.config.hooks == (2, 3) and model.config.layer_norm_eps == 1e-6


def test_other_files_are_refused_naming_the_file(tmp_path, tiny):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=re.escape(str(other))):
        load_midas(other)
    extra = dict(tiny["orig_state"])
    extra["scratch.auxlayer.0.weight"] = torch.zeros(1)
    path = tmp_path / "with_aux.pt"
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match=re.escape("scratch.auxlayer.0.weight")):
        load_midas(path)
    large = tmp_path / "dpt_large-midas-2f21e586.pt"  # plain ViT-L: no ResNet backbone
    torch.save(
        {
            "pretrained.model.pos_embed": torch.zeros(1, 577, 8),
            "pretrained.model.blocks.23.norm1.weight": torch.zeros(8),
        },
        large,
    )
    with pytest.raises(CheckpointError, match=r"dpt_large-midas-2f21e586\.pt is not a DPT-Hybrid"):
        load_midas(large)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"is_hybrid": false}')
    (bad / "model.safetensors").write_bytes((tiny["folder"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="is_hybrid"):
        load_midas(bad)


def test_full_size_structure_matches_transformers_and_the_original_shapes():
    """On the meta device: the released configuration (Intel/dpt-hybrid-midas, MiDaS v3 DPT-Hybrid) has the
    same parameters in both layouts, and both config readers give it."""
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(
        is_hybrid=True,
        neck_hidden_sizes=[256, 512, 768, 768],
        reassemble_factors=[1, 1, 1, 0.5],
        backbone_featmap_shape=[1, 1024, 24, 24],
    )
    with torch.device("meta"):
        hf = {k: tuple(v.shape) for k, v in DPTForDepthEstimation(cfg).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in DPTHybrid().state_dict().items()}
    mapped: dict[str, tuple[int, ...]] = {}
    for key, shape in ours.items():
        name = transformers_name(key)
        if isinstance(name, tuple):  # q, k, v stacked
            assert shape == (sum(hf[n][0] for n in name), *hf[name[0]][1:])
            mapped.update({n: hf[n] for n in name})
        else:
            assert hf[name] == shape, key
            mapped[name] = shape
    assert mapped.keys() == hf.keys()
    assert 122e6 < sum(torch.Size(s).numel() for s in ours.values()) < 123e6  # DPT-Hybrid: ~122.4 M

    raw = json.loads(cfg.to_json_string(use_diff=True))
    assert config_from_transformers(raw, "config.json") == MidasConfig(layer_norm_eps=raw["layer_norm_eps"])

    class Shapes:  # an original-layout file seen through its shapes only
        def keys(self):
            return [*ours, "pretrained.model.head.weight", "pretrained.model.head.bias"]

        def shape(self, key):
            return ours[key]

    assert config_from_original(Shapes(), MIDAS_FILE) == MidasConfig()


def test_bfloat16_weights_run_close_to_float32(tiny):
    model = load_midas(tiny["original"], dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    depth = estimate_depth(model, tiny["images"], size=(SIZE, SIZE))[:, 0]
    assert depth.dtype == torch.float32
    err = (depth - tiny["ref"]).abs().max().item()
    assert err < 0.05 * tiny["ref"].abs().max().item()


def test_other_input_sizes_resize_the_position_grid_as_transformers(tiny):
    """96 x 96 (a 6 x 6 grid from the 4 x 4 one): transformers refuses sizes other than its config's unless
    told, so its embedding's expected size is changed; the resize itself is its own (bilinear)."""
    hf = tiny["hf"]
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    hf.dpt.embeddings.image_size = (96, 96)
    try:
        with torch.no_grad():
            ref = hf(pixel_values=(images - 0.5) / 0.5).predicted_depth
    finally:
        hf.dpt.embeddings.image_size = (SIZE, SIZE)
    model = load_midas(tiny["original"])
    _close(estimate_depth(model, images, size=(96, 96))[:, 0], ref)
