"""The loaded model: a family, its networks and tokenizers, and what can be done with them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentforge.adapters.folders import AdapterFolders
from latentforge.adapters.patcher import ModelPatcher
from latentforge.conditioning.text import PromptEmbedding, TextConditioner
from latentforge.device import parse_dtype
from latentforge.families import Family
from latentforge.models.clip import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNet
from latentforge.models.vae import AutoencoderKL

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from latentforge.offload import Offloader
    from latentforge.pipelines.generate import GenerationResult, Progress
    from latentforge.pipelines.options import GenerationOptions
    from latentforge.pipelines.request import GenerationRequest

__all__ = ["LoadInfo", "Pipeline", "PromptEmbedding"]


@dataclass
class LoadInfo:
    """How a pipeline was loaded, for ``inspect`` and for the user's logs."""

    source: str
    layout: str
    family_reason: str
    prediction_reason: str
    vae_source: str
    extras: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dtype_reason: str = ""


class Pipeline:
    """What ``latentforge.load`` returns.

    Attributes: ``family`` (a ``Family``), ``prediction`` ('eps' or 'v'), ``unet``, ``vae``, ``text``
    (the ``TextConditioner``: encoders and tokenizers in the family's order, also reachable as
    ``text_encoders`` and ``tokenizers``), ``extras`` (tensors of the file outside the networks, kept
    for saving), ``info`` (how it was loaded: detection, parameterisation, VAE source), ``patcher``
    (the one owner of everything applied to the loaded weights: patches, hooks), ``offloader`` and
    ``execution_device`` (set by ``enable_offload``) and ``caches`` (values derived from the model,
    such as its hash and preview weights, computed once), ``folders`` (where LoRAs and embeddings named
    in prompts are found).
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
        open_model: Callable[[str], tuple[Family, Callable[[], Pipeline]]] | None = None,
        open_vae: Callable[[str | Path | None], AutoencoderKL] | None = None,
    ):
        self.family = family
        self.prediction = prediction
        self.unet = unet
        self.vae = vae
        self.text = TextConditioner(family.text, text_encoders, tokenizers)
        self.extras = extras or {}
        self.info = info
        self.patcher = ModelPatcher(self.networks)
        # where prompt tags and request networks find LoRAs and embeddings by name
        self.folders = AdapterFolders()
        self.text.embeddings.folders = lambda: self.folders.embeddings
        self.text.embeddings.fallback = lambda: self.folders.bundled_for("embeddings")
        self.offloader: Offloader | None = None
        self.execution_device: torch.device | None = None  # where computation happens under offload
        self.caches: dict[str, object] = {}
        # another checkpoint (the refiner) -> (its family from names and shapes, a loader like this one)
        self.open_model = open_model
        self.open_vae = open_vae  # a standalone VAE path (None: the checkpoint's own) -> a loaded VAE
        self._own_vae: AutoencoderKL | None = None  # the checkpoint's VAE while another one is in use
        self.zero_terminal_snr = False  # trained with a zero-terminal-SNR schedule (v-prediction SDXL models)

    def noise_schedule(self):
        """The training noise schedule generation and training use for this model."""
        from latentforge.sampling.schedules import NoiseSchedule

        return NoiseSchedule.for_family(self.family, zero_terminal_snr=self.zero_terminal_snr)

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        return self.text.encoders

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        return self.text.tokenizers

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks by name: "unet", "vae", then "text_encoder", "text_encoder_2", ... (the names of
        ``ModelPatcher`` patches and of diffusers folders)."""
        nets: dict[str, torch.nn.Module] = {"unet": self.unet, "vae": self.vae}
        for i, enc in enumerate(self.text.encoders):
            nets["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = enc
        return nets

    def cached(self, key: str, make):
        """A value derived from the loaded model, computed on first use (model hash, preview weights)."""
        if key not in self.caches:
            self.caches[key] = make()
        return self.caches[key]

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.unet.parameters()).device

    def compile(self, **options):
        """Compile the UNet's forward with torch.compile (optional: it pays off over many steps, mostly on
        GPUs; the first call compiles for minutes on a CPU). The module itself is unchanged, so saving
        and inspection keep working; patches and hooks added later are traced again. Without options:
        ``mode="reduce-overhead"`` (CUDA graphs for fixed shapes) on a CUDA device, torch's default
        elsewhere (the CLI's and server's ``--compile``)."""
        from latentforge.nn.packed import settle

        if not options and self.device.type == "cuda":
            options = {"mode": "reduce-overhead"}

        settle(self.unet)  # weights a generation left packed (nn/packed.py): plain again before tracing
        self.patcher.compile("unet", **options)
        return self

    def pack_weights(self, enable: bool = True) -> int:
        """Pack the UNet's and VAE's convolution (and bf16 linear) weights once into oneDNN's layout
        instead of on every call (CPU; the same results; costs a second copy of those weights in memory).
        ``False`` undoes it. Returns the number of layers changed. See ``latentforge.nn.packed``."""
        from latentforge.nn.packed import pack_weights, unpack_weights

        change = pack_weights if enable else unpack_weights
        return change(self.unet) + change(self.vae)

    def set_vae(self, vae: str | Path | None = None) -> None:
        """Decode and encode with another VAE from now on: a standalone VAE file or diffusers VAE folder, or
        a name in ``folders.vae`` (file name or stem); None: the checkpoint's own again (kept in memory
        while another is in use). A VAE that does not fit the model is refused (``load_vae``) and the
        current one stays. Images record the VAE in their infotext ("VAE", "VAE hash")."""
        current = self.info.vae_source if self.info else "checkpoint"
        path = None if vae is None else self.folders.find_vae(str(vae))
        wanted = "checkpoint" if path is None else str(path)
        if wanted == current or (path is not None and current != "checkpoint" and Path(current) == path):
            return
        if self.offloader is not None or "vae" in self.patcher.compiled:
            raise RuntimeError("set_vae: the VAE is offloaded or compiled; set the VAE before enable_offload/compile")
        if any(name.startswith("vae.") for name in self.patcher.patched()):
            raise RuntimeError("set_vae: patches are applied to the VAE; remove them first (pipe.patcher.remove)")
        if path is None and self._own_vae is not None:
            model, self._own_vae = self._own_vae, None
        else:
            if self.open_vae is None:
                raise RuntimeError("set_vae: this pipeline was not loaded from a file (latentforge.load)")
            model = self.open_vae(path)
            if current == "checkpoint":
                self._own_vae = self.vae
        self.vae = model
        if self.info is not None:
            self.info.vae_source = wanted
        for key in ("infotext model fields", "preview weights"):  # derived from the VAE
            self.caches.pop(key, None)

    def enable_offload(self, device: str | torch.device = "cuda", *, sequential: bool = False) -> Offloader:
        """Keep the weights in CPU memory and compute on ``device`` (a GPU with little memory): whole
        networks move in turn, or with ``sequential=True`` one block at a time. See latentforge.offload."""
        from latentforge.offload import make_offloader

        if self.offloader is not None:
            self.offloader.remove()
        nets = [*self.text.encoders, self.unet, self.vae]
        if self._own_vae is not None:  # the checkpoint's VAE kept aside by set_vae: in CPU memory too
            self._own_vae.to("cpu")
        self.offloader = make_offloader(nets, self.patcher, device, sequential=sequential)
        self.execution_device = self.offloader.device
        return self.offloader

    def apply_lora(self, path: str | Path, *, strength: float = 1.0, text_strength: float | None = None) -> str:
        """Merge a LoRA/LyCORIS file (a path, or a name in ``folders.lora``) into the UNet with ``strength``
        and the text encoders with ``text_strength`` (default ``strength``) until ``remove_lora``; applying
        the same file again replaces it. Returns the patcher source name. See ``adapters.lora``."""
        from latentforge.adapters.lora import apply_lora

        path = self.folders.find_lora(str(path))
        return apply_lora(self, path, strength=strength, text_strength=text_strength).source

    def remove_lora(self, path_or_source: str | Path | None = None) -> None:
        """Take back a LoRA applied with ``apply_lora`` (by path, file stem or source), or all of them; the
        weights return to the loaded values bit for bit."""
        sources = [s for s in self.patcher.sources if s.startswith("lora:")]
        if path_or_source is not None:
            name = str(path_or_source)
            wanted = {name, f"lora:{name}", f"lora:{Path(name).stem}"}
            sources = [s for s in sources if s in wanted]
            if not sources:
                raise KeyError(f"no LoRA {name!r} is applied; applied: {self.patcher.sources or 'none'}")
        for source in sources:
            self.patcher.remove(source)

    def apply_hypernetwork(self, path: str | Path, *, strength: float = 1.0) -> str:
        """Apply an A1111 hypernetwork (a path, or a name in ``folders.hypernetworks``) to the attention
        layers' context until ``patcher.remove(source)``; returns the source. See ``adapters.hypernetwork``."""
        from latentforge.adapters.hypernetwork import apply_hypernetwork

        return apply_hypernetwork(self, self.folders.find_hypernetwork(str(path)), strength=strength)

    def applied_networks(self) -> list[tuple]:
        """(NetworkRef by path, hash) of the LoRAs and hypernetworks applied to this pipeline and not taken
        back (``apply_lora``, ``apply_hypernetwork``, or the adapter functions themselves), in the order
        applied: every image's infotext hashes and JSON record name them. A request's own networks
        (sources ``request:...``) are not among them."""
        from latentforge.pipelines.request import NetworkRef

        return [
            (NetworkRef(str(r.path), r.kind, strength=r.strength, text_strength=r.text_strength), r.hash)
            for source, r in self.patcher.records()
            if not source.startswith("request:")
        ]

    def load_embedding(self, path: str | Path):
        """Make a textual-inversion file usable in prompts by its file stem (see ``conditioning.embeddings``)."""
        return self.text.embeddings.add(path)

    def __repr__(self) -> str:
        return f"<latentforge.Pipeline {self.family.name} ({self.prediction}) {self.dtype} on {self.device}>"

    @torch.inference_mode()
    def encode_prompt(
        self, prompts: str | list[str], *, clip_skip: int | None = None, syntax: str = "a1111"
    ) -> PromptEmbedding:
        """Text -> UNet conditioning by the family's rules (``TextConditioner.encode``, which documents
        ``clip_skip`` and the A1111 ``syntax``), on the pipeline's device without gradients."""
        return self.text.encode(prompts, clip_skip=clip_skip, syntax=syntax, device=self.device)

    def txt2img(
        self,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        progress: Callable[[Progress], None] | None = None,
        upscaler_dirs: Sequence[str | Path] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> GenerationResult:
        """Generate images from text. Either a ``GenerationRequest`` or its fields as keywords, e.g.
        ``pipe.txt2img("a red circle", steps=20, sampler="Euler a", seed=1)``. Returns a
        ``GenerationResult`` (``.images``: PIL images carrying their parameters, ``.seeds``,
        ``.infotexts``, ``.request``). ``upscaler_dirs``: folders where ``hr_upscaler`` may name an
        ESRGAN-family model (``latentforge.upscalers``)."""
        from latentforge.pipelines import generate

        return generate(self, _request(prompt, request, options), progress=progress, upscaler_dirs=upscaler_dirs)

    def img2img(
        self,
        image,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        progress: Callable[[Progress], None] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> GenerationResult:
        """Generate from an init image (a PIL image or a path, or a list of them), noised to the start
        sigma that ``denoising_strength`` gives and sampled over the remaining steps (A1111's rule)."""
        from latentforge.pipelines import generate

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        return generate(self, _request(prompt, request, options), init_images=images, progress=progress)

    def upscale(
        self,
        image,
        prompt: str | None = None,
        *,
        noise_level: int = 20,
        tile: int | None = None,
        request: GenerationRequest | None = None,
        progress: Callable[[Progress], None] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> GenerationResult:
        """Upscale a low-resolution image (a PIL image or a path, or a list of them) 4x with an x4 upscaler
        model, guided by ``prompt``: ``noise_level`` (0 to 350) noises the input first; ``tile`` sets
        latent pixels per tile (None automatic for large inputs, 0 never). See pipelines/upscale_x4.py."""
        from latentforge.pipelines import X4Options, generate

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if request is None:
            options["x4"] = X4Options(noise_level=noise_level, tile=tile)
        req = _request(prompt, request, options)
        if req.x4 is None:
            raise ValueError("the request given to upscale() has no x4 group; set request.x4 = X4Options(...)")
        return generate(self, req, init_images=images, progress=progress)

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
