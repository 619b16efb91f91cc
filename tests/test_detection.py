"""Family detection and config inference at full size, from key names and shapes only (meta tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import UNet2DConditionModel

import latentforge
from latentforge.convert import diffusers as dconv
from latentforge.convert import openclip
from latentforge.families import families, get_family
from latentforge.families.base import config_signature
from latentforge.families.detect import DetectionError, candidates
from latentforge.io.components import check
from latentforge.io.diffusers_folder import mapped_refs, vae_refs_diffusers
from latentforge.io.single_file import SingleFileSource
from latentforge.models import AutoencoderKL, CLIPTextModel, UNet


class ShapeFile:
    """A stand-in for a weights file that has names and shapes but no data."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.metadata: dict[str, str] = {}

    def keys(self):
        return list(self.state)

    def shape(self, key):
        return tuple(self.state[key].shape)

    def dtype(self, key):
        return self.state[key].dtype

    def read(self, key, dtype=None):
        raise AssertionError("detection must not read tensor data")

    def close(self):
        pass


def original_state(fam) -> dict[str, torch.Tensor]:
    """A full-size single-file checkpoint of ``fam`` as meta tensors, as the original repos lay it out."""
    out = {}
    with torch.device("meta"):
        out.update({"model.diffusion_model." + k: v for k, v in UNet(fam.unet).state_dict().items()})
        out.update({"first_stage_model." + k: v for k, v in AutoencoderKL(fam.vae).state_dict().items()})
        for spec in fam.text:
            state = CLIPTextModel(spec.config).state_dict()
            if spec.style == "openclip":
                out.update({spec.prefix + k: v for k, v in openclip.from_hf(state).items()})
                w = spec.config.width
                out.setdefault(spec.prefix + "text_projection", torch.empty(w, w))
                out[spec.prefix + "logit_scale"] = torch.empty(())
            else:
                out.update({spec.prefix + "text_model." + k: v for k, v in state.items()})
        out["alphas_cumprod"] = torch.empty(1000)
    return out


def _source(state, name="model.safetensors") -> SingleFileSource:
    return SingleFileSource(Path(name), ShapeFile(state))


@pytest.mark.parametrize("fam", families(), ids=lambda f: f.name)
def test_full_size_single_file_is_detected_and_configs_inferred(fam):
    source = _source(original_state(fam))
    found = candidates(source.signature(), "single", source.name)
    expected = {"sd2", "sd2-v"} if fam.name in ("sd2", "sd2-v") else {fam.name}
    assert {f.name for f in found} == expected
    ucfg, urefs = source.unet(fam)
    assert ucfg == fam.unet
    vcfg, vrefs = source.vae(fam)
    assert vcfg == fam.vae
    with torch.device("meta"):
        check({k: tuple(v.shape) for k, v in UNet(ucfg).state_dict().items()}, urefs, "UNet", "x")
        check({k: tuple(v.shape) for k, v in AutoencoderKL(vcfg).state_dict().items()}, vrefs, "VAE", "x")
    for spec in fam.text:
        tcfg, trefs = source.text(spec)
        assert tcfg == spec.config
        with torch.device("meta"):
            check({k: tuple(v.shape) for k, v in CLIPTextModel(tcfg).state_dict().items()}, trefs, spec.name, "x")
    extras = [k for k in source.keys if k not in source._claimed]
    assert "alphas_cumprod" in extras


# Full-size diffusers configs as published in the official model repositories (unet/config.json).
_DOWN4 = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP4 = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
DIFFUSERS_UNETS = {
    "sd1": dict(
        attention_head_dim=8,
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=768,
        down_block_types=_DOWN4,
        up_block_types=_UP4,
        in_channels=4,
    ),
    "sd1-inpaint": dict(
        attention_head_dim=8,
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=768,
        down_block_types=_DOWN4,
        up_block_types=_UP4,
        in_channels=9,
    ),
    "sd2-v": dict(
        attention_head_dim=[5, 10, 20, 20],
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=1024,
        down_block_types=_DOWN4,
        up_block_types=_UP4,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sd2-depth": dict(
        attention_head_dim=[5, 10, 20, 20],
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=1024,
        down_block_types=_DOWN4,
        up_block_types=_UP4,
        use_linear_projection=True,
        in_channels=5,
    ),
    "sd-x4-upscaler": dict(
        attention_head_dim=8,
        block_out_channels=[256, 512, 512, 1024],
        cross_attention_dim=1024,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
        in_channels=7,
        num_class_embeds=1000,
        only_cross_attention=[True, True, True, False],
        use_linear_projection=True,
    ),
    "sdxl-base": dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280],
        cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2816,
        transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
    ),
    "sdxl-refiner": dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        attention_head_dim=[6, 12, 24, 24],
        block_out_channels=[384, 768, 1536, 1536],
        cross_attention_dim=1280,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2560,
        transformer_layers_per_block=4,
        use_linear_projection=True,
    ),
}
_TEXT_ACT = {"clip-l": "quick_gelu", "openclip-h": "gelu", "openclip-g": "gelu"}


@pytest.mark.parametrize("name", list(DIFFUSERS_UNETS))
def test_full_size_diffusers_configs_and_keys(name):
    fam = get_family(name)
    cfg = dconv.unet_config_from_diffusers(DIFFUSERS_UNETS[name])
    text = tuple(f"{s.folder}:{_TEXT_ACT[s.name]}" for s in fam.text)
    sig = config_signature(cfg, len(fam.vae.channel_mult), text)
    assert fam in candidates(sig, "diffusers", name)
    assert cfg == fam.unet
    with torch.device("meta"):
        reference = UNet2DConditionModel(**DIFFUSERS_UNETS[name]).state_dict()
    refs = mapped_refs(ShapeFile(reference), lambda: UNet(cfg), lambda k: [dconv.unet_key(k, cfg.num_res_blocks)])
    with torch.device("meta"):
        check({k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}, refs, "UNet", name)
    levels = len(fam.vae.channel_mult)
    vae_json = dict(
        block_out_channels=[128 * m for m in fam.vae.channel_mult],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=2,
        latent_channels=4,
    )
    vcfg = dconv.vae_config_from_diffusers(vae_json)
    with torch.device("meta"):
        vrefs = vae_refs_diffusers(ShapeFile(DAutoencoderKL(**vae_json).state_dict()), vcfg)
        check({k: tuple(v.shape) for k, v in AutoencoderKL(vcfg).state_dict().items()}, vrefs, "VAE", name)


def test_unknown_architecture_names_file_found_and_nearest():
    state = original_state(get_family("sd1"))
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 6, 3, 3, device="meta")
    source = _source(state, "weird.safetensors")
    with pytest.raises(DetectionError) as err:
        candidates(source.signature(), "single", source.name)
    msg = str(err.value)
    assert "weird.safetensors" in msg and "in_channels=6" in msg
    assert "sd1:" in msg and "unet_in 4 (file has 6)" in msg


def test_files_that_are_not_checkpoints_say_what_they_look_like():
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.empty(4, 320, device="meta")}
    with pytest.raises(DetectionError, match="LoRA"):
        _source(lora).signature()
    vae = {"encoder.conv_in.weight": torch.empty(128, 3, 3, 3, device="meta")}
    with pytest.raises(DetectionError, match="standalone VAE"):
        _source(vae).signature()


def test_forced_family_must_fit():
    source = _source(original_state(get_family("sd1")))
    assert candidates(source.signature(), "single", "f", forced="sd15") == [get_family("sd1")]
    with pytest.raises(DetectionError, match="cannot be loaded as sdxl-base"):
        candidates(source.signature(), "single", "f", forced="sdxl")


def test_every_family_has_a_distinct_structure_except_the_eps_v_pair():
    sigs = {}
    for fam in families():
        sigs.setdefault(fam.signature(), []).append(fam.name)
    shared = [names for names in sigs.values() if len(names) > 1]
    assert shared == [["sd2", "sd2-v"]]
    assert latentforge.get_family("sd2").prediction != latentforge.get_family("sd2-v").prediction
