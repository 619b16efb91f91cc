"""Building blocks shared by the UNet, the VAE and the text encoders."""

from latentforge.nn.attention import CrossAttention, attention
from latentforge.nn.blocks import GroupNorm32, timestep_embedding

__all__ = ["CrossAttention", "GroupNorm32", "attention", "timestep_embedding"]
