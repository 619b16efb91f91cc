"""Text -> the UNet's text conditioning: one object for generation and training alike.

``TextConditioner`` holds a family's text encoders, their tokenizers and the rules of each encoder
(which layer, final LayerNorm or not, pooled output), and applies A1111's prompt handling: emphasis
weights, 75-token chunks, ``BREAK``, clip skip. Extra token vectors (textual-inversion embeddings)
enter here, as ``extra`` rows of the encoders' token tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from latentforge.conditioning.embeddings import Embedding, EmbeddingSet, split_on_embeddings
from latentforge.conditioning.prompt import PromptError, chunk_prompt

EMBEDDING_BASE = 1 << 24  # placeholder ids of embedding rows while chunking (never a vocabulary id)


@dataclass
class PromptEmbedding:
    context: Tensor  # (B, T, context_dim): cross-attention input of the UNet
    pooled: Tensor | None = None  # (B, P): SDXL's pooled text vector


class TextConditioner:
    """A family's text encoders with their tokenizers and rules (``TextEncoderSpec``), in family order."""

    def __init__(self, specs: Sequence, encoders: Sequence, tokenizers: Sequence):
        if not (len(specs) == len(encoders) == len(tokenizers)):
            raise ValueError("a text conditioner needs one encoder and one tokenizer per text-encoder spec")
        self.specs = tuple(specs)
        self.encoders = tuple(encoders)
        self.tokenizers = tuple(tokenizers)
        self.embeddings = EmbeddingSet()  # textual inversion, named in prompts by file stem

    @property
    def slots(self) -> list[tuple[str, int]]:
        """(encoder name, width) of each text encoder, what textual-inversion vectors must fit."""
        return [(spec.name, enc.config.width) for spec, enc in zip(self.specs, self.encoders)]

    def encode(
        self,
        prompts: str | list[str],
        *,
        clip_skip: int | None = None,
        syntax: str = "a1111",
        device: torch.device | str | None = None,
    ) -> PromptEmbedding:
        """Text -> UNet conditioning, by the family's rules (differentiable: callers choose the grad mode).

        SD1: last CLIP-L layer through the final LayerNorm (``clip_skip`` = k uses the k-th layer from
        the end instead, A1111's "Clip skip"); SD2: penultimate OpenCLIP-H layer through the final
        LayerNorm; SDXL: penultimate CLIP-L and bigG layers without it, concatenated, plus bigG's pooled
        vector. ``clip_skip`` applies to encoders that use the last layer by default (SD1, as A1111).

        ``syntax="a1111"`` (default) reads emphasis ``(word:1.2)``/``[word]`` and ``BREAK``, and encodes
        prompts longer than 75 tokens in chunks (context length 77 x chunks); weights scale the token
        embeddings, then the chunk is rescaled to its original mean, as A1111 does. ``syntax="plain"``
        truncates at 77 tokens without weights, as diffusers does (and as training reads captions).
        The pooled vector comes from the first chunk.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if clip_skip is not None and clip_skip < 1:
            raise ValueError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
        for spec, enc in zip(self.specs, self.encoders):
            layers = enc.config.layers + enc.config.dropped_layers  # the layers the file had
            if clip_skip is not None and spec.layer == -1 and clip_skip > layers:
                raise PromptError(
                    f"clip_skip {clip_skip} is more than the {layers} layers of this model's text encoder; "
                    f"use 1 (the last layer) to {layers}"
                )
        if device is None:
            device = next(self.encoders[0].parameters()).device
        first = self.tokenizers[0]
        comma = first.encode(",")[0]
        embs = self.embeddings.find(" ".join(prompts), self.slots)
        encode = _encode_with(first.encode, embs)
        chunked = [chunk_prompt(p, encode, comma, syntax) for p in prompts]
        n_chunks = max(len(c) for c in chunked)
        for c in chunked:  # batch rows need the same chunk count: pad with empty chunks
            c.extend(chunk_prompt("", first.encode, comma, "plain")[0] for _ in range(n_chunks - len(c)))
        contexts, pooled = [], None
        for i, (spec, enc, tok) in enumerate(zip(self.specs, self.encoders, self.tokenizers)):
            extra = torch.cat([e.for_encoders(self.slots)[i] for e in embs]).to(device) if embs else None
            layer = spec.layer
            if clip_skip is not None and clip_skip > 1 and spec.layer == -1:
                layer = -clip_skip
            per_chunk = []
            for k in range(n_chunks):
                ids = torch.tensor([tok.frame(c[k].tokens) for c in chunked], device=device)
                if extra is not None:  # embedding rows follow the encoder's vocabulary
                    ids = torch.where(ids >= EMBEDDING_BASE, ids - EMBEDDING_BASE + enc.config.vocab_size, ids)
                out = enc(ids, layer=layer, final_norm=spec.final_norm, pooled=spec.pooled and k == 0, extra=extra)
                hidden = out.hidden
                weights = [[1.0, *c[k].weights] + [1.0] * (76 - len(c[k].weights)) for c in chunked]
                w = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)
                if (w != 1).any():
                    mean = hidden.mean()
                    hidden = hidden * w[:, :, None]
                    hidden = hidden * (mean / hidden.mean())
                per_chunk.append(hidden)
                if k == 0 and spec.pooled:
                    pooled = out.pooled
            contexts.append(torch.cat(per_chunk, dim=1))
        return PromptEmbedding(torch.cat(contexts, dim=-1), pooled)


def _encode_with(encode, embeddings: list[Embedding]):
    """The tokenizer's ``encode`` with each named embedding replaced by a tuple of placeholder ids (its rows
    in ``extra``, in the order of ``embeddings``)."""
    if not embeddings:
        return encode
    start, offsets = 0, {}
    for e in embeddings:
        offsets[e.name] = start
        start += e.count

    def run(text: str) -> list:
        out: list = []
        for piece in split_on_embeddings(text, embeddings):
            if isinstance(piece, Embedding):
                first = EMBEDDING_BASE + offsets[piece.name]
                out.append(tuple(range(first, first + piece.count)))
            elif piece.strip():
                out.extend(encode(piece))
        return out

    return run
