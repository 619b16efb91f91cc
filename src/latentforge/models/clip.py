"""CLIP text transformers (Radford et al. 2021): OpenAI ViT-L/14 and OpenCLIP ViT-H/14 and ViT-bigG/14.

One implementation with Hugging Face module names (``embeddings.token_embedding``, ``encoder.layers.{i}
.self_attn.q_proj`` ...); checkpoints with OpenCLIP names are translated by ``latentforge.convert
.openclip``. The encoder returns the hidden state of any layer, optionally through the final LayerNorm,
and the pooled projection at the end token (SDXL's "pooled" vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn import attention

END_TOKEN = 49407


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # OpenAI CLIP-L; OpenCLIP H and bigG use "gelu"
    projection_dim: int | None = None  # width of text_projection (bigG: 1280), None = no projection
    layer_norm_eps: float = 1e-5
    # final layers of the original encoder that are not stored (diffusers keeps SD2's OpenCLIP-H as its
    # first 23 of 24 layers); negative layer indices count from the original depth
    dropped_layers: int = 0


def _activation(name: str, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown text-encoder activation {name!r}")


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activation(self.activation, self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: Tensor, extra: Tensor | None = None) -> Tensor:
        """Token plus position embeddings. ``extra`` (E, width): further token vectors (textual inversion),
        addressed by ids ``vocab_size`` to ``vocab_size + E - 1``."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        if extra is None:
            tokens = self.token_embedding(ids)
        else:
            weight = self.token_embedding.weight
            tokens = F.embedding(ids, torch.cat([weight, extra.to(device=weight.device, dtype=weight.dtype)]))
        return tokens + self.position_embedding(positions)[None]


class _Layers(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


@dataclass
class TextEncoderOutput:
    hidden: Tensor  # (B, T, width): the requested layer, through the final LayerNorm if asked
    pooled: Tensor | None  # (B, projection_dim): final-LN last layer at the end token, projected


class CLIPTextModel(nn.Module):
    """Causal text transformer with learned positions.

    ``forward(ids, layer=-1, final_norm=True, pooled=False, extra=None)``: ``layer`` counts like Python
    indices over the outputs of the original encoder's layers (-1 last, -2 penultimate = "clip skip
    2"), also when the stored encoder lacks its last ``dropped_layers``; layers past the requested one
    are not run unless the pooled output needs them. ``extra`` (E, width) holds token vectors beyond
    the vocabulary (textual-inversion embeddings), which ids from ``vocab_size`` on select.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = _Layers(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    def forward(
        self,
        ids: Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        pooled: bool = False,
        extra: Tensor | None = None,
    ) -> TextEncoderOutput:
        n = self.config.layers
        index = layer if layer >= 0 else n + self.config.dropped_layers + layer  # 0-based output index
        if not 0 <= index < n:
            raise ValueError(f"layer {layer} is outside this {n}-layer text encoder")
        if pooled and (self.config.projection_dim is None or self.config.dropped_layers):
            raise ValueError("this text encoder has no text_projection; pooled output is unavailable")
        last = n - 1 if pooled else index
        x = self.embeddings(ids, extra)
        hidden = x
        for i, block in enumerate(self.encoder.layers[: last + 1]):
            x = block(x)
            if i == index:
                hidden = x
        if final_norm:
            hidden = self.final_layer_norm(hidden)
        pool = None
        if pooled:
            end = (ids == END_TOKEN).int().argmax(dim=-1)  # first end token of each row
            last_hidden = self.final_layer_norm(x)
            pool = self.text_projection(last_hidden[torch.arange(ids.shape[0], device=ids.device), end])
        return TextEncoderOutput(hidden=hidden, pooled=pool)
