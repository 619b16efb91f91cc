"""Textual-inversion training (Gal et al. 2022): new token vectors learned with the model frozen.

The vectors are an ``Embedding`` added to the pipeline's ``TextConditioner``, so a caption that names the
token encodes it exactly as generation will (the text encoders' ``extra`` rows); only those rows get
gradients. They start as the token embeddings of ``init_text`` (A1111's rule: vector i is the init
text's token ``i * len // num_vectors``). Files are A1111's: ``<token>.safetensors`` holding
``emb_params`` (or ``clip_l``/``clip_g`` for a two-encoder SDXL model) and ``<token>.pt`` holding
``{"string_to_param": {"*": vectors}, "name", "step", ...}`` (plain containers, so
``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from latentforge.conditioning.embeddings import _PAIR_KEYS, Embedding
from latentforge.io.writer import write_safetensors
from latentforge.train.config import ConfigError, EmbeddingConfig


class EmbeddingVectors(nn.Module):
    """The trained vectors, one parameter per text encoder ("clip_l"/"clip_g" for SDXL pairs, else "vectors")."""

    def __init__(self, pipe, cfg: EmbeddingConfig):
        super().__init__()
        self.token = cfg.token.strip()
        if not re.fullmatch(r"[\w-]+", self.token):
            raise ConfigError(f"embedding.token {cfg.token!r} must be one word (letters, digits, _ or -)")
        text = pipe.text
        self.params = nn.ParameterDict()
        for spec, enc, tok in zip(text.specs, text.encoders, text.tokenizers):
            ids = tok.encode(cfg.init_text)
            if not ids:
                raise ConfigError(f"embedding.init_text {cfg.init_text!r} has no tokens; give a word such as '*'")
            table = enc.embeddings.token_embedding.weight.detach().float().cpu()
            n = cfg.num_vectors
            rows = torch.stack([table[ids[i * len(ids) // n]] for i in range(n)])
            self.params[self.key(spec.name, len(text.specs))] = nn.Parameter(rows.to(table.device))
        self.embedding = Embedding(self.token, None, self._vectors())

    @staticmethod
    def key(encoder: str, count: int) -> str:
        if count == 1:
            return "vectors"
        if encoder not in _PAIR_KEYS:
            raise ConfigError(f"textual inversion for text encoder {encoder} is not supported (SD1, SD2, SDXL are)")
        return _PAIR_KEYS[encoder]

    def _vectors(self) -> dict[str, torch.Tensor]:
        return {("*" if k == "vectors" else k): p for k, p in self.params.items()}

    def attach(self, pipe) -> None:
        """Make the token known to the pipeline's text conditioner (the live parameters, not a copy)."""
        self.embedding.vectors = self._vectors()
        pipe.text.embeddings.add(self.embedding)

    def caption(self, text: str) -> str:
        """A caption that names the token: A1111's ``[name]`` placeholder replaced, else the token first."""
        if "[name]" in text:
            return text.replace("[name]", self.token)
        if re.search(rf"(?<![\w-]){re.escape(self.token)}(?![\w-])", text, re.IGNORECASE):
            return text
        return f"{self.token}, {text}" if text else self.token

    def save(self, folder: Path, step: int, base: str = "") -> tuple[Path, Path]:
        """``<token>.safetensors`` and ``<token>.pt`` in A1111's layouts."""
        vectors = {k: v.detach().float().cpu().contiguous() for k, v in self._vectors().items()}
        st = folder / f"{self.token}.safetensors"
        tensors = {"emb_params": vectors["*"]} if "*" in vectors else vectors
        write_safetensors(tensors, st, metadata={"name": self.token, "step": str(step)}, overwrite=True)
        pt = folder / f"{self.token}.pt"
        if "*" in vectors:
            data = {
                "string_to_token": {"*": 265},
                "string_to_param": {"*": vectors["*"]},
                "name": self.token,
                "step": step,
                "sd_checkpoint_name": Path(base).name,
            }
        else:
            data = dict(vectors)
        tmp = pt.with_suffix(".pt.partial")
        torch.save(data, tmp)
        tmp.replace(pt)
        return st, pt
