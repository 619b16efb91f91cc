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

    execution_device: torch.device | None = None  # set by enable_offload: where computation happens

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.unet.parameters()).device

    def compile(self, **options):
        """Compile the UNet's forward with torch.compile (optional: it pays off over many steps, mostly on
        GPUs; the first call compiles for minutes on a CPU). The module itself is unchanged, so saving
        and inspection keep working."""
        self.unet.forward = torch.compile(self.unet.forward, **options)
        return self

    def enable_offload(self, device: str | torch.device = "cuda", *, sequential: bool = False):
        """Keep the weights in CPU memory and compute on ``device`` (a GPU with little memory): whole
        networks move in turn, or with ``sequential=True`` one block at a time. See latentforge.offload."""
        from latentforge.offload import enable_offload

        return enable_offload(self, device, sequential=sequential)

    def __repr__(self) -> str:
        return f"<latentforge.Pipeline {self.family.name} ({self.prediction}) {self.dtype} on {self.device}>"

    @torch.inference_mode()
    def encode_prompt(
        self, prompts: str | list[str], *, clip_skip: int | None = None, syntax: str = "a1111"
    ) -> PromptEmbedding:
        """Text -> UNet conditioning, by the family's rules.

        SD1: last CLIP-L layer through the final LayerNorm (``clip_skip`` = k uses the k-th layer from
        the end instead, A1111's "Clip skip"); SD2: penultimate OpenCLIP-H layer through the final
        LayerNorm; SDXL: penultimate CLIP-L and bigG layers without it, concatenated, plus bigG's pooled
        vector. ``clip_skip`` applies to encoders that use the last layer by default (SD1, as A1111).

        ``syntax="a1111"`` (default) reads emphasis ``(word:1.2)``/``[word]`` and ``BREAK``, and encodes
        prompts longer than 75 tokens in chunks (context length 77 x chunks); weights scale the token
        embeddings, then the chunk is rescaled to its original mean, as A1111 does. ``syntax="plain"``
        truncates at 77 tokens without weights, as diffusers does. The pooled vector comes from the
        first chunk.
        """
        from latentforge.conditioning.prompt import chunk_prompt

        if isinstance(prompts, str):
            prompts = [prompts]
        if clip_skip is not None and clip_skip < 1:
            raise ValueError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
        first = self.tokenizers[0]
        comma = first.encode(",")[0]
        chunked = [chunk_prompt(p, first.encode, comma, syntax) for p in prompts]
        n_chunks = max(len(c) for c in chunked)
        for c in chunked:  # batch rows need the same chunk count: pad with empty chunks
            c.extend(chunk_prompt("", first.encode, comma, "plain")[0] for _ in range(n_chunks - len(c)))
        contexts, pooled = [], None
        for spec, enc, tok in zip(self.family.text, self.text_encoders, self.tokenizers):
            layer = spec.layer
            if clip_skip is not None and clip_skip > 1 and spec.layer == -1:
                layer = -clip_skip
            per_chunk = []
            for k in range(n_chunks):
                ids = torch.tensor([tok.frame(c[k].tokens) for c in chunked], device=self.device)
                out = enc(ids, layer=layer, final_norm=spec.final_norm, pooled=spec.pooled and k == 0)
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

    def txt2img(self, prompt: str | None = None, *, request=None, progress=None, **options):
        """Generate images from text. Either a ``GenerationRequest`` or its fields as keywords, e.g.
        ``pipe.txt2img("a red circle", steps=20, sampler="Euler a", seed=1)``. Returns a
        ``GenerationResult`` (``.images``: PIL images carrying their parameters, ``.seeds``,
        ``.infotexts``, ``.request``)."""
        from latentforge.pipelines import generate

        return generate(self, _request(prompt, request, options), progress=progress)

    def img2img(self, image, prompt: str | None = None, *, request=None, progress=None, **options):
        """Generate from an init image (a PIL image or a path, or a list of them), noised to the start
        sigma that ``denoising_strength`` gives and sampled over the remaining steps (A1111's rule)."""
        from latentforge.pipelines import generate

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        return generate(self, _request(prompt, request, options), init_images=images, progress=progress)

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


def _request(prompt, request, options):
    from latentforge.pipelines import GenerationRequest

    if request is not None:
        if options or prompt is not None:
            raise ValueError("pass either a GenerationRequest or keyword options, not both")
        return request
    if prompt is not None:
        options["prompt"] = prompt
    return GenerationRequest.from_dict(options)
