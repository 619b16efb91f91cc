"""A model family is a value: its architectures, latent scale, parameterisation and native size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentforge.families.conditioners import Conditioner
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: where its weights live and which of its outputs the UNet sees.

    ``style`` names the key layout inside single-file checkpoints: ``"hf"`` (Hugging Face CLIP names,
    OpenAI CLIP-L) or ``"openclip"`` (OpenCLIP names, translated on load). ``layer``/``final_norm``
    pick the context: e.g. SD1 uses the last layer through the final LayerNorm, SDXL the penultimate
    layer without it. ``pooled`` marks the encoder whose projected end-token output SDXL needs.
    """

    name: str  # "clip-l", "openclip-h", "openclip-g"
    config: TextEncoderConfig
    style: Literal["hf", "openclip"]
    prefix: str  # single-file key prefix, e.g. "cond_stage_model.transformer."
    folder: str  # diffusers folder, e.g. "text_encoder_2"
    pad_id: int
    layer: int = -1
    final_norm: bool = True
    pooled: bool = False
    head_channels: int = 64
    diffusers_dropped_layers: int = 0  # diffusers folders store this many fewer final layers


@dataclass(frozen=True)
class Signature:
    """What detection reads from key names and shapes; sizes are not part of it, so small test models
    of the same structure are recognised as their family."""

    unet_in: int
    label: str  # "none" | "adm" | "classes"
    proj: str  # "conv" | "linear"
    levels: int
    attn_levels: tuple[int, ...]
    text: tuple[str, ...]  # single file: key prefixes; diffusers: "folder:activation"
    vae_levels: int

    def differences(self, other: Signature) -> list[str]:
        out = []
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name} {b!r} (file has {a!r})")
        return out


@dataclass(frozen=True, kw_only=True)
class Family:
    """A model family: its architectures and the traits that decide how it is run, trained and saved.

    Callers ask a family's traits instead of branching on its name: ``conditioner`` builds the UNet's
    conditioning (families/conditioners.py), ``vae_fp16_safe`` says whether its VAE may run in fp16,
    ``ays_table`` which Align Your Steps levels fit it, ``diffusers_pipeline``/``diffusers_extras`` what
    a diffusers folder of it declares.
    """

    name: str
    title: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextEncoderSpec, ...]
    latent_scale: float
    prediction: Prediction
    default_size: int
    conditioner: Conditioner = field(default_factory=Conditioner)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # the CFG scale a request gets when it names none (GenerationRequest.cfg_scale None); A1111's 7 unless
    # the family's guided denoiser is too stiff for some samplers there (the demo model, docs/demo-model.md)
    default_cfg: float = 7.0
    vae_fp16_safe: bool = True  # False: the VAE overflows in fp16 (SDXL) and runs in bf16 or fp32 instead
    ays_table: Literal["sd1", "sdxl"] = "sd1"  # which published Align Your Steps levels suit the family
    diffusers_pipeline: str = "StableDiffusionPipeline"
    diffusers_extras: tuple[tuple[str, object], ...] = ()  # further model_index.json entries
    aliases: tuple[str, ...] = ()

    def signature(self, layout: Literal["single", "diffusers"] = "single") -> Signature:
        if layout == "single":
            text = tuple(spec.prefix for spec in self.text)
        else:
            text = tuple(f"{spec.folder}:{spec.config.activation}" for spec in self.text)
        return config_signature(self.unet, len(self.vae.channel_mult), text)


def config_signature(u: UNetConfig, vae_levels: int, text: tuple[str, ...]) -> Signature:
    """The signature of an architecture given as configs (text slots in any order)."""
    return Signature(
        unet_in=u.in_channels,
        label="adm" if u.adm_in_channels else "classes" if u.num_classes else "none",
        proj="linear" if u.use_linear_proj else "conv",
        levels=len(u.channel_mult),
        attn_levels=tuple(i for i, d in enumerate(u.transformer_depth) if d),
        text=tuple(sorted(text)),
        vae_levels=vae_levels,
    )


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} is registered twice")
    _REGISTRY[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_REGISTRY.values())


def get_family(name: str) -> Family:
    key = name.lower()
    for fam in _REGISTRY.values():
        if key == fam.name or key in fam.aliases:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(_REGISTRY)}")
