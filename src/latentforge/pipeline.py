"""The loaded model: a family, its networks and tokenizers, and what can be done with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentforge.families import Family
from latentforge.loading import LoadInfo, parse_dtype
from latentforge.models.clip import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNet
from latentforge.models.vae import AutoencoderKL


@dataclass
class PromptEmbedding:
    context: Tensor  # (B, T, context_dim): cross-attention input of the UNet
    pooled: Tensor | None = None  # (B, P): SDXL's pooled text vector


class Pipeline:
    """What ``latentforge.load`` returns.

    Attributes: ``family`` (a ``Family``), ``prediction`` ('eps' or 'v'), ``unet``, ``vae``,
    ``text_encoders`` and ``tokenizers`` (one per encoder of the family, in the family's order),
    ``extras`` (tensors of the file outside the networks, kept for saving) and ``info`` (how it was
    loaded: detection, parameterisation, VAE source).
    """

    def __init__(
        self,
        family: Family,
        prediction: str,
        unet: UNet,
        vae: AutoencoderKL,
        text_encoders: tuple[CLIPTextModel, ...],
        tokenizers: tuple[CLIPTokenizer, ...],
        *,
        extras: dict[str, Tensor] | None = None,
        info: LoadInfo | None = None,
    ):
        self.family = family
        self.prediction = prediction
        self.unet = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.extras = extras or {}
        self.info = info

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def __repr__(self) -> str:
        return f"<latentforge.Pipeline {self.family.name} ({self.prediction}) {self.dtype} on {self.device}>"

    @torch.inference_mode()
    def encode_prompt(self, prompts: str | list[str], *, clip_skip: int | None = None) -> PromptEmbedding:
        """Text -> UNet conditioning, by the family's rules.

        SD1: last CLIP-L layer through the final LayerNorm (``clip_skip`` = k uses the k-th layer from
        the end instead, A1111's "Clip skip"); SD2: penultimate OpenCLIP-H layer through the final
        LayerNorm; SDXL: penultimate CLIP-L and bigG layers without it, concatenated, plus bigG's pooled
        vector. ``clip_skip`` applies to encoders that use the last layer by default (SD1, as A1111).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if clip_skip is not None and clip_skip < 1:
            raise ValueError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
        contexts, pooled = [], None
        for spec, enc, tok in zip(self.family.text, self.text_encoders, self.tokenizers):
            ids = tok(prompts).to(self.device)
            layer = spec.layer
            if clip_skip is not None and clip_skip > 1 and spec.layer == -1:
                layer = -clip_skip
            out = enc(ids, layer=layer, final_norm=spec.final_norm, pooled=spec.pooled)
            contexts.append(out.hidden)
            if spec.pooled:
                pooled = out.pooled
        return PromptEmbedding(torch.cat(contexts, dim=-1), pooled)

    def save(
        self,
        path: str | Path,
        *,
        layout: str = "single-file",
        dtype: str | torch.dtype | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save as a single ``.safetensors`` file in the original layout, or as a diffusers folder."""
        from latentforge.io.diffusers_folder import save_diffusers
        from latentforge.io.single_file import save_single_file

        torch_dtype = parse_dtype(dtype)
        if layout == "single-file":
            if Path(path).suffix.lower() != ".safetensors":
                raise ValueError(f"{path}: single-file output must end in .safetensors")
            return save_single_file(self, path, dtype=torch_dtype, overwrite=overwrite)
        if layout == "diffusers":
            return save_diffusers(self, path, dtype=torch_dtype, overwrite=overwrite)
        raise ValueError(f"unknown layout {layout!r}; use 'single-file' or 'diffusers'")
