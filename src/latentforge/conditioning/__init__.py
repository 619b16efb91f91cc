"""Conditioning: prompt syntax and chunking, and the non-text inputs (SDXL vector)."""

from latentforge.conditioning.prompt import Chunk, chunk_prompt, parse_attention
from latentforge.conditioning.vectors import sdxl_vector

__all__ = ["Chunk", "chunk_prompt", "parse_attention", "sdxl_vector"]
