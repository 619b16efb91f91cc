"""What ``latentforge serve`` was started with."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

VAE_BESIDE = (".vae.ckpt", ".vae.pt", ".vae.safetensors")  # a checkpoint's own VAE file, beside it


@dataclass
class ServerConfig:
    """What ``latentforge serve`` was started with (A1111's flags where it has them)."""

    model: Path | None = None  # the model loaded first (default: the bundled demo model)
    models_dir: Path | None = None  # a folder of checkpoints selectable by name
    outdir: Path = Path("outputs")  # where save_images writes
    queue_size: int = 64  # waiting jobs at most (the running one not counted)
    max_models: int = 1  # loaded models kept at once
    max_model_bytes: int = 0  # 0: no limit besides max_models
    max_image_pixels: int = 4096 * 4096  # input images above this are refused before decoding
    max_output_pixels: int = 4096 * 4096  # width x height x batch_size of one pass (after hires) at most
    max_queued_pixels: int = 2 * 8 * 4096 * 4096  # decoded input pixels held by unfinished jobs (two full requests)
    max_body_bytes: int = 64 << 20
    history: int = 32  # finished jobs kept for GET /latentforge/v1/jobs/{id}
    max_batch: int = 4  # images of queued jobs run as one batch at most (server/batching.py); 1: each job alone
    device: str | None = None
    dtype: str | None = None
    compile: bool = False  # torch.compile each loaded model's UNet (Pipeline.compile's defaults)
    upscaler_dirs: list[Path] = field(default_factory=list)  # ESRGAN-family files for hr_upscaler
    controlnet_dirs: list[Path] = field(default_factory=list)  # ControlNet files units may name
    lora_dirs: list[Path] = field(default_factory=list)  # LoRA files <lora:name:w> may name
    embedding_dirs: list[Path] = field(default_factory=list)  # textual-inversion embeddings
    hypernetwork_dirs: list[Path] = field(default_factory=list)  # A1111 hypernetworks
    vae_dirs: list[Path] = field(default_factory=list)  # standalone VAEs the sd_vae setting may name
    styles_files: list[Path] = field(default_factory=list)  # A1111 styles.csv files (wildcards allowed)

    def network_folders(self):
        """The folders prompts' networks are found in (``AdapterFolders``): the ones given, then those of the
        A1111 or ComfyUI installation that ``models_dir`` belongs to (its ``models/Stable-diffusion`` or
        ``models/checkpoints``: ``models/Lora``, ``embeddings``, ``models/loras``, ``models/VAE``, ...), then the
        bundled ones."""
        from latentforge.adapters.folders import AdapterFolders

        folders = AdapterFolders(
            lora=list(self.lora_dirs),
            embeddings=list(self.embedding_dirs),
            hypernetworks=list(self.hypernetwork_dirs),
            vae=list(self.vae_dirs),
        )
        if self.models_dir is not None and Path(self.models_dir).resolve().parent.name.lower() == "models":
            with contextlib.suppress(FileNotFoundError):  # an installation without network folders
                folders.add_models_dir(Path(self.models_dir).resolve().parent.parent)
        folders.controlnet = []  # units name ControlNets through controlnet_dirs (controlnets())
        return folders

    def vaes(self) -> dict[str, Path]:
        """Standalone VAEs by file name, as /sdapi/v1/sd-vae lists them and ``sd_vae`` names them, in A1111's
        order (``refresh_vae_list``): the ``*.vae.ckpt``, ``*.vae.pt``, ``*.vae.safetensors`` files beside the
        checkpoints (--models-dir, the startup model's folder), then the VAE folders' ``.ckpt``, ``.pt``,
        ``.safetensors`` files; the first of a name wins. "Automatic" takes the first whose name starts
        with the checkpoint's (``ModelCache.vae_path``)."""
        beside = sorted(Path(self.models_dir).rglob("*")) if self.models_dir else []
        if self.model is not None and Path(self.model).is_file():
            beside += sorted(Path(self.model).resolve().parent.glob("*"))
        folders = [p for folder in self.network_folders().vae for p in sorted(Path(folder).rglob("*"))]
        found: dict[str, Path] = {}
        for files, suffixes in ((beside, VAE_BESIDE), (folders, (".ckpt", ".pt", ".safetensors"))):
            for suffix in suffixes:
                for path in files:
                    if path.name.lower().endswith(suffix) and path.is_file():
                        found.setdefault(path.name, path.resolve())
        return found

    def styles(self) -> dict:
        """The saved prompt styles by name (``conditioning.styles``), read afresh: the --styles-file files,
        else the ``styles.csv`` of the A1111 installation around ``models_dir`` (missing files: none)."""
        from latentforge.conditioning.styles import read_styles

        files = list(self.styles_files)
        models = Path(self.models_dir).resolve().parent if self.models_dir is not None else None
        if not files and models is not None and models.name.lower() == "models":
            files = [models.parent / "styles.csv"]
        return read_styles(files, missing_ok=True)

    def controlnets(self) -> dict[str, Path]:
        """ControlNet files by name (file stem), as /controlnet/model_list lists them."""
        from latentforge.adapters.folders import CONTROLNET_SUFFIXES, files_by_stem

        return {k: v.resolve() for k, v in files_by_stem(self.controlnet_dirs, CONTROLNET_SUFFIXES).items()}
