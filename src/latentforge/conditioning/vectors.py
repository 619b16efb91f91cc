"""Conditioning inputs besides the text context: the SDXL "vector" of pooled text and size numbers."""

from __future__ import annotations

import torch
from torch import Tensor

from latentforge.nn import timestep_embedding


def sdxl_vector(pooled: Tensor, numbers: Tensor, dim: int = 256) -> Tensor:
    """SDXL's vector input: pooled bigG text (B, P) followed by a ``dim``-wide sinusoidal embedding
    (cos then sin) of each number in ``numbers`` (B, k). Base: k = 6 (original h, w, crop top, crop
    left, target h, w); refiner: k = 5 (original h, w, crop top, crop left, aesthetic score)."""
    b = pooled.shape[0]
    emb = timestep_embedding(numbers.reshape(-1).float(), dim).reshape(b, -1)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)
