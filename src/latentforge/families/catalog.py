"""The Stable Diffusion families latentforge knows, with their full-size configurations.

Numbers from the original model configurations (see docs/architecture.md and shared reference notes);
checked against the reference libraries by the parity tests.
"""

from __future__ import annotations

from latentforge.families.base import Family, TextEncoderSpec, register
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

SD1 = register(
    Family(
        "sd1",
        "Stable Diffusion 1.x",
        SD1_UNET,
        VAE_F8,
        _SD1_TEXT,
        0.18215,
        "eps",
        512,
        "txt2img",
        aliases=("sd15", "sd1.5", "sd-v1"),
    )
)
SD1_INPAINT = register(
    Family(
        "sd1-inpaint",
        "Stable Diffusion 1.x inpainting",
        UNetConfig(in_channels=9),
        VAE_F8,
        _SD1_TEXT,
        0.18215,
        "eps",
        512,
        "inpaint",
        diffusers_pipeline="StableDiffusionInpaintPipeline",
    )
)
SD2 = register(
    Family(
        "sd2",
        "Stable Diffusion 2.x (512, eps)",
        SD2_UNET,
        VAE_F8,
        _SD2_TEXT,
        0.18215,
        "eps",
        512,
        "txt2img",
        aliases=("sd21-base", "sd2-base"),
    )
)
SD2_V = register(
    Family(
        "sd2-v",
        "Stable Diffusion 2.x (768, v-prediction)",
        UNetConfig(num_heads=None, head_channels=64, context_dim=1024, use_linear_proj=True, upcast_attention=True),
        VAE_F8,
        _SD2_TEXT,
        0.18215,
        "v",
        768,
        "txt2img",
        aliases=("sd21", "sd2-768"),
    )
)
SD2_DEPTH = register(
    Family(
        "sd2-depth",
        "Stable Diffusion 2 depth-to-image",
        UNetConfig(in_channels=5, num_heads=None, head_channels=64, context_dim=1024, use_linear_proj=True),
        VAE_F8,
        _SD2_TEXT,
        0.18215,
        "eps",
        512,
        "depth",
        diffusers_pipeline="StableDiffusionDepth2ImgPipeline",
    )
)
SD_X4_UPSCALER = register(
    Family(
        "sd-x4-upscaler",
        "Stable Diffusion x4 upscaler",
        UNetConfig(
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
        VAE_F4,
        _SD2_TEXT,
        0.08333,
        "v",
        512,
        "upscale",
        beta_start=0.0001,
        beta_end=0.02,
        diffusers_pipeline="StableDiffusionUpscalePipeline",
        aliases=("x4", "upscaler"),
    )
)
SDXL_BASE = register(
    Family(
        "sdxl-base",
        "Stable Diffusion XL base",
        UNetConfig(
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
        VAE_F8,
        _SDXL_TEXT,
        0.13025,
        "eps",
        1024,
        "sdxl",
        diffusers_pipeline="StableDiffusionXLPipeline",
        aliases=("sdxl",),
    )
)
SDXL_REFINER = register(
    Family(
        "sdxl-refiner",
        "Stable Diffusion XL refiner",
        UNetConfig(
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
        VAE_F8,
        _REFINER_TEXT,
        0.13025,
        "eps",
        1024,
        "refiner",
        diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
    )
)

# The small model latentforge trains itself and ships (docs/demo-model.md): same architecture, reduced
# widths; 64 px images, f=4 VAE (16x16 latents), a 4-layer CLIP-style text encoder on the real CLIP
# tokenizer, v-prediction. Its latent space is normalised during VAE training, hence scale 1.0.
DEMO_TEXT = TextEncoderConfig(width=64, layers=4, heads=2, mlp_width=256, activation="quick_gelu")
DEMO = register(
    Family(
        "demo",
        "latentforge demo model (coloured shapes, 64 px)",
        UNetConfig(
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
        VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
        (
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
        1.0,
        "v",
        64,
        "txt2img",
    )
)
