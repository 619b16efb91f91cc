"""Tiny reference models: each family's structure built with diffusers/transformers at reduced widths.

Every parameter is perturbed after construction so that zero-initialised tensors (biases, some
projections) cannot hide a wrong key mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import latentforge
from latentforge.models.tokenizer import CLIPTokenizer as OurTokenizer
from latentforge.train import TrainConfig, load_config

TEXT_WIDTH = 128  # 2 heads at 64 channels per head, the families' head width
TIME_DIM = 8  # SDXL size-embedding width in the tiny configs (256 at full size)

_SD1_UNET = dict(
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    cross_attention_dim=TEXT_WIDTH,
)
_SD2_UNET = dict(
    block_out_channels=(64, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(1, 1, 2, 2),
    cross_attention_dim=TEXT_WIDTH,
    use_linear_projection=True,
)


@dataclass
class TinySpec:
    unet: dict
    text: list[tuple[str, int, bool]]  # (activation, layers, with projection)
    vae_blocks: tuple[int, ...] = (32, 64, 64, 64)
    pipeline: str = "StableDiffusionPipeline"
    prediction: str = "epsilon"
    pads: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    scale: float = 0.18215


TINY: dict[str, TinySpec] = {
    "sd1": TinySpec(dict(_SD1_UNET, in_channels=4), [("quick_gelu", 2, False)]),
    "sd1-inpaint": TinySpec(
        dict(_SD1_UNET, in_channels=9), [("quick_gelu", 2, False)], pipeline="StableDiffusionInpaintPipeline"
    ),
    "sd2": TinySpec(dict(_SD2_UNET, in_channels=4), [("gelu", 2, False)], pads=["!"]),
    "sd2-v": TinySpec(
        dict(_SD2_UNET, in_channels=4, upcast_attention=True),
        [("gelu", 2, False)],
        prediction="v_prediction",
        pads=["!"],
    ),
    "sd2-depth": TinySpec(
        dict(_SD2_UNET, in_channels=5), [("gelu", 2, False)], pads=["!"], pipeline="StableDiffusionDepth2ImgPipeline"
    ),
    "sd-x4-upscaler": TinySpec(
        dict(
            block_out_channels=(32, 64, 64, 64),
            in_channels=7,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            attention_head_dim=8,
            cross_attention_dim=TEXT_WIDTH,
            use_linear_projection=True,
            num_class_embeds=1000,
            only_cross_attention=[True, True, True, False],
        ),
        [("gelu", 2, False)],
        vae_blocks=(32, 64, 64),
        pipeline="StableDiffusionUpscalePipeline",
        prediction="v_prediction",
        pads=["!"],
        scale=0.08333,
    ),
    "sdxl-base": TinySpec(
        dict(
            block_out_channels=(64, 64, 128),
            in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3),
            attention_head_dim=(1, 1, 2),
            cross_attention_dim=2 * TEXT_WIDTH,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_DIM,
        ),
        [("quick_gelu", 2, False), ("gelu", 3, True)],
        pipeline="StableDiffusionXLPipeline",
        pads=["<|endoftext|>", "!"],
        scale=0.13025,
    ),
    "sdxl-refiner": TinySpec(
        dict(
            block_out_channels=(64, 64, 128, 128),
            in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=2,
            attention_head_dim=(1, 1, 2, 2),
            cross_attention_dim=TEXT_WIDTH,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 5 * TIME_DIM,
        ),
        [("gelu", 3, True)],
        pipeline="StableDiffusionXLImg2ImgPipeline",
        pads=["!"],
        scale=0.13025,
    ),
}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


@dataclass
class Reference:
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    spec: TinySpec


def build_reference(family: str, seed: int = 0) -> Reference:
    spec = TINY[family]
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(sample_size=8, layers_per_block=2, norm_num_groups=32, **spec.unet), seed + 1)
    levels = len(spec.vae_blocks)
    vae = perturb(
        AutoencoderKL(
            block_out_channels=spec.vae_blocks,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=spec.scale,
            sample_size=32,
        ),
        seed + 2,
    )
    encoders = []
    for i, (act, layers, proj) in enumerate(spec.text):
        cfg = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_attention_heads=TEXT_WIDTH // 64,
            num_hidden_layers=layers,
            hidden_act=act,
            max_position_embeddings=77,
            projection_dim=TEXT_WIDTH,
            pad_token_id=1,
            bos_token_id=49406,
            eos_token_id=49407,
        )
        cls = CLIPTextModelWithProjection if proj else CLIPTextModel
        encoders.append(perturb(cls(cfg), seed + 3 + i))
    return Reference(family, unet, vae, encoders, spec)


def write_tokenizer_files(folder: Path, pad: str) -> None:
    """vocab.json + merges.txt from the bundled OpenAI vocabulary (the layout of diffusers folders)."""
    tok = OurTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}), encoding="utf-8"
    )


def hf_tokenizer(pad: str = "<|endoftext|>", tmp: Path | None = None):
    """transformers' CLIPTokenizer built from the same vocabulary files."""
    import tempfile

    from transformers import CLIPTokenizer

    folder = Path(tmp or tempfile.mkdtemp()) / "tok"
    write_tokenizer_files(folder, pad)
    return CLIPTokenizer.from_pretrained(folder)


def diffusers_sdxl(ref: Reference, scheduler, tmp: Path):
    """diffusers' StableDiffusionXLPipeline of an SDXL base reference: its networks, ``scheduler``, and
    transformers' tokenizers with the family's pads (written under ``tmp/t1`` and ``tmp/t2``)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizers = [hf_tokenizer(pad, tmp / f"t{i + 1}") for i, pad in enumerate(ref.spec.pads)]
    return StableDiffusionXLPipeline(ref.vae, *ref.text_encoders, *tokenizers, ref.unet, scheduler)


def save_folder(ref: Reference, path: Path) -> Path:
    """Write ``ref`` as a diffusers folder with each component's own ``save_pretrained``."""
    path.mkdir(parents=True)
    ref.unet.save_pretrained(path / "unet")
    ref.vae.save_pretrained(path / "vae")
    index = {
        "_class_name": ref.spec.pipeline,
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    folders = (
        ["text_encoder", "text_encoder_2"]
        if len(ref.text_encoders) == 2
        else (["text_encoder_2"] if ref.family == "sdxl-refiner" else ["text_encoder"])
    )
    for folder, enc, pad in zip(folders, ref.text_encoders, ref.spec.pads):
        enc.save_pretrained(path / folder)
        tok_folder = folder.replace("text_encoder", "tokenizer")
        write_tokenizer_files(path / tok_folder, pad)
        index[folder] = ["transformers", type(enc).__name__]
        index[tok_folder] = ["transformers", "CLIPTokenizer"]
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=ref.spec.prediction
    )
    sched.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return path


def tiny_sd1_file(tmp: Path, seed: int) -> tuple[Reference, Path]:
    """The tiny SD1 reference built with ``seed`` (diffusers' networks) and our single file of it, written
    (through a diffusers folder ``tmp/m``) to ``tmp/base.safetensors``: the base model of training tests."""
    ref = build_reference("sd1", seed=seed)
    return ref, latentforge.load(save_folder(ref, tmp / "m")).save(tmp / "base.safetensors")


# A training test's run, quiet and plain: no warm-up, nothing saved or sampled along the way, fp32, no log
# lines (a test that wants some adds its own override after these: the last assignment of a key wins).
QUIET_RUN = ("lr_warmup=0", "save_every=0", "sample_every=0", 'mixed_precision="no"', "log_every=1000")


def quiet_train_config(out: Path, base: Path, *extra: str) -> TrainConfig:
    """``load_config`` of a test run: output ``out``, base model ``base``, ``QUIET_RUN``, then ``extra``."""
    return load_config(None, [f'output="{out}"', f'model.base="{base}"', *QUIET_RUN, *extra])


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float, float]:
    """Max |ours - ref| within ``rel`` x max |ref| (the output scale)."""
    diff = float((ours.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    return diff <= rel * scale, diff, scale


def diffusers_controlnet(ref: Reference, folder: Path, seed: int = 11):
    """diffusers' ControlNetModel made from the reference's UNet, its zero convolutions moved off zero
    (``perturb``), and saved in ``folder`` in the diffusers layout -> (net, path of the file)."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    net = perturb(ControlNetModel.from_unet(ref.unet), seed)
    path = Path(folder) / "control_v11p_tiny_inpaint.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def write_demo_controlnet(path: Path) -> Path:
    """A random ControlNet for the bundled demo model (f=4 latents: two stride-2 convolutions in the hint
    encoder), its zero convolutions moved off zero so it changes the image; saved in the original layout."""
    from safetensors.torch import save_file

    from latentforge.families import get_family
    from latentforge.models.controlnet import ControlNet, ControlNetConfig

    torch.manual_seed(0)
    net = ControlNet(ControlNetConfig(unet=get_family("demo").unet, hint_widths=(8, 16, 32)))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}, path)
    return Path(path)
