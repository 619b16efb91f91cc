"""The Stable Diffusion families latentforge knows, with their full-size configurations.

Numbers from the original model configurations (see docs/architecture.md and shared reference notes);
checked against the reference libraries by the parity tests.
"""

from __future__ import annotations

from latentforge.families.base import Family, TextEncoderSpec, register
from latentforge.families.conditioners import (
    DepthConditioner,
    InpaintConditioner,
    RefinerConditioner,
    SDXLConditioner,
    UpscaleConditioner,
)
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

CLIP_L = TextEncoderConfig(width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu")
OPENCLIP_H = TextEncoderConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu")
OPENCLIP_G = TextEncoderConfig(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280)

VAE_F8 = VAEConfig(channel_mult=(1, 2, 4, 4))
VAE_F4 = VAEConfig(channel_mult=(1, 2, 4))

_SD1_TEXT = (TextEncoderSpec("clip-l", CLIP_L, "hf", "cond_stage_model.transformer.", "text_encoder", pad_id=49407),)
_SD2_TEXT = (
    TextEncoderSpec(
        "openclip-h",
        OPENCLIP_H,
        "openclip",
        "cond_stage_model.model.",
        "text_encoder",
        pad_id=0,
        layer=-2,
        diffusers_dropped_layers=1,
    ),
)
_SDXL_TEXT = (
    TextEncoderSpec(
        "clip-l",
        CLIP_L,
        "hf",
        "conditioner.embedders.0.transformer.",
        "text_encoder",
        pad_id=49407,
        layer=-2,
        final_norm=False,
    ),
    TextEncoderSpec(
        "openclip-g",
        OPENCLIP_G,
        "openclip",
        "conditioner.embedders.1.model.",
        "text_encoder_2",
        pad_id=0,
        layer=-2,
        final_norm=False,
        pooled=True,
    ),
)
_REFINER_TEXT = (
    TextEncoderSpec(
        "openclip-g",
        OPENCLIP_G,
        "openclip",
        "conditioner.embedders.0.model.",
        "text_encoder_2",
        pad_id=0,
        layer=-2,
        final_norm=False,
        pooled=True,
    ),
)

SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=None, head_channels=64, context_dim=1024, use_linear_proj=True)

# what the diffusers folders of StableDiffusionPipeline-style models declare besides their components
_NO_SAFETY_CHECKER = (
    ("safety_checker", (None, None)),
    ("feature_extractor", (None, None)),
    ("requires_safety_checker", False),
)

SD1 = register(
    Family(
        name="sd1",
        title="Stable Diffusion 1.x",
        unet=SD1_UNET,
        vae=VAE_F8,
        text=_SD1_TEXT,
        latent_scale=0.18215,
        prediction="eps",
        default_size=512,
        diffusers_extras=_NO_SAFETY_CHECKER,
        aliases=("sd15", "sd1.5", "sd-v1"),
    )
)
SD1_INPAINT = register(
    Family(
        name="sd1-inpaint",
        title="Stable Diffusion 1.x inpainting",
        unet=UNetConfig(in_channels=9),
        vae=VAE_F8,
        text=_SD1_TEXT,
        latent_scale=0.18215,
        prediction="eps",
        default_size=512,
        conditioner=InpaintConditioner(),
        diffusers_pipeline="StableDiffusionInpaintPipeline",
        diffusers_extras=_NO_SAFETY_CHECKER,
    )
)
SD2 = register(
    Family(
        name="sd2",
        title="Stable Diffusion 2.x (512, eps)",
        unet=SD2_UNET,
        vae=VAE_F8,
        text=_SD2_TEXT,
        latent_scale=0.18215,
        prediction="eps",
        default_size=512,
        diffusers_extras=_NO_SAFETY_CHECKER,
        aliases=("sd21-base", "sd2-base"),
    )
)
SD2_V = register(
    Family(
        name="sd2-v",
        title="Stable Diffusion 2.x (768, v-prediction)",
        unet=UNetConfig(
            num_heads=None, head_channels=64, context_dim=1024, use_linear_proj=True, upcast_attention=True
        ),
        vae=VAE_F8,
        text=_SD2_TEXT,
        latent_scale=0.18215,
        prediction="v",
        default_size=768,
        diffusers_extras=_NO_SAFETY_CHECKER,
        aliases=("sd21", "sd2-768"),
    )
)
SD2_DEPTH = register(
    Family(
        name="sd2-depth",
        title="Stable Diffusion 2 depth-to-image",
        unet=UNetConfig(in_channels=5, num_heads=None, head_channels=64, context_dim=1024, use_linear_proj=True),
        vae=VAE_F8,
        text=_SD2_TEXT,
        latent_scale=0.18215,
        prediction="eps",
        default_size=512,
        conditioner=DepthConditioner(),
        diffusers_pipeline="StableDiffusionDepth2ImgPipeline",
    )
)
SD_X4_UPSCALER = register(
    Family(
        name="sd-x4-upscaler",
        title="Stable Diffusion x4 upscaler",
        unet=UNetConfig(
            in_channels=7,
            model_channels=256,
            channel_mult=(1, 2, 2, 4),
            transformer_depth=(0, 1, 1, 1),
            num_heads=8,
            context_dim=1024,
            use_linear_proj=True,
            num_classes=1000,
            cross_only=(True, True, True, False),
        ),
        vae=VAE_F4,
        text=_SD2_TEXT,
        latent_scale=0.08333,
        prediction="v",
        default_size=512,
        conditioner=UpscaleConditioner(),
        beta_start=0.0001,
        beta_end=0.02,
        diffusers_pipeline="StableDiffusionUpscalePipeline",
        aliases=("x4", "upscaler"),
    )
)
SDXL_BASE = register(
    Family(
        name="sdxl-base",
        title="Stable Diffusion XL base",
        unet=UNetConfig(
            model_channels=320,
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            num_heads=None,
            head_channels=64,
            context_dim=2048,
            use_linear_proj=True,
            adm_in_channels=2816,
        ),
        vae=VAE_F8,
        text=_SDXL_TEXT,
        latent_scale=0.13025,
        prediction="eps",
        default_size=1024,
        conditioner=SDXLConditioner(),
        vae_fp16_safe=False,
        ays_table="sdxl",
        diffusers_pipeline="StableDiffusionXLPipeline",
        aliases=("sdxl",),
    )
)
SDXL_REFINER = register(
    Family(
        name="sdxl-refiner",
        title="Stable Diffusion XL refiner",
        unet=UNetConfig(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(0, 4, 4, 0),
            transformer_depth_middle=4,
            num_heads=None,
            head_channels=64,
            context_dim=1280,
            use_linear_proj=True,
            adm_in_channels=2560,
        ),
        vae=VAE_F8,
        text=_REFINER_TEXT,
        latent_scale=0.13025,
        prediction="eps",
        default_size=1024,
        conditioner=RefinerConditioner(),
        vae_fp16_safe=False,
        ays_table="sdxl",
        diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
    )
)

# The small model latentforge trains itself and ships (docs/demo-model.md): same architecture, reduced
# widths; 64 px images, f=4 VAE (16x16 latents), a 4-layer CLIP-style text encoder on the real CLIP
# tokenizer, v-prediction. Its latent space is normalised during VAE training, hence scale 1.0.
DEMO_TEXT = TextEncoderConfig(width=64, layers=4, heads=2, mlp_width=256, activation="quick_gelu")
DEMO = register(
    Family(
        name="demo",
        title="latentforge demo model (coloured shapes, 64 px)",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2, 2),
            transformer_depth=(0, 1, 1),
            transformer_depth_middle=1,
            num_heads=None,
            head_channels=32,
            context_dim=64,
            use_linear_proj=True,
            norm_groups=8,
        ),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
        text=(
            TextEncoderSpec(
                "clip-demo",
                DEMO_TEXT,
                "hf",
                "cond_stage_model.transformer.",
                "text_encoder",
                pad_id=49407,
                head_channels=32,
            ),
        ),
        latent_scale=1.0,
        prediction="v",
        default_size=64,
        # Its prompts fix each image's colours, so the unconditional estimate follows the latent's mean
        # colour while the conditional one does not; CFG 7 turns that difference into a stiff mode that
        # LMS, PLMS, IPNDM, DEIS, UniPC and the ancestral steps cannot integrate in 20 steps (their images
        # oscillate into wrong colours). At 2 every sampler draws the prompts (docs/demo-model.md); A1111's
        # DDIM CFG++, whose scale is 12.5 x CFG++'s lambda, keeps its own default (SamplerInfo.default_cfg).
        default_cfg=2.0,
        diffusers_extras=_NO_SAFETY_CHECKER,
    )
)
