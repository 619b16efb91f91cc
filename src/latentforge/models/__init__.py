"""The networks of Stable Diffusion: UNet, VAE, CLIP text encoders, and the CLIP tokenizer."""

from latentforge.models.clip import CLIPTextModel, TextEncoderConfig
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNet, UNetConfig
from latentforge.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTokenizer", "TextEncoderConfig", "UNet", "UNetConfig", "VAEConfig"]
