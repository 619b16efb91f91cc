"""Where users keep LoRAs and embeddings, and how a name in a prompt becomes a file.

A name is a file stem, searched in the given folders and their subfolders (A1111's rule); an unknown
name is an error listing close matches. ``models_dir`` understands the two usual layouts: A1111's
(``models/Lora``, ``models/LyCORIS``, ``embeddings``) and ComfyUI's (``models/loras``, ``models/embeddings``).

Names found in none of the user's folders fall back to the ``bundled`` folders (the demo adapters in
``assets/demo``, trained for the demo model: ``lora/``, ``embeddings/``, ``controlnet/``), so
``<lora:demo_star:1>`` works out of the box; the user's files always win. Bundled embeddings are used
only where they fit the model (``EmbeddingSet``), so they never reach a model of another width, as A1111
skips embeddings of another width.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.demo import bundled_adapters_folder
from latentforge.io.embedding_image import IMAGE_SUFFIXES, EmbeddingImageError, read_embedding_image

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
HYPERNETWORK_SUFFIXES = (".pt",)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # A1111's models/VAE


class AdapterNotFound(LookupError):
    """A LoRA or embedding name matches no file; the message lists the folders and close names."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


def files_by_stem(folders: list[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Stem -> file for every file with one of ``suffixes`` under ``folders`` (the first folder wins)."""
    out: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in suffixes and path.is_file():
                out.setdefault(path.stem, path)
    return out


_IMAGE_NAMES: dict[Path, tuple[int, int, str | None]] = {}  # image -> (mtime, size, embedding name): read once


def image_embedding_name(path: Path) -> str | None:
    """The name of the embedding an image file holds (its data's ``name``, as A1111, else the file stem), or
    None when it holds none (a preview or any other picture); read again only when the file changes. A
    card whose embedding data is damaged counts as an embedding named by its stem, so that naming it in a
    prompt gives its error; a file that is no readable image is skipped, as A1111 skips it."""
    stat = path.stat()
    cached = _IMAGE_NAMES.get(path)
    if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
        return cached[2]
    try:
        data = read_embedding_image(path)
    except EmbeddingImageError as e:
        data = {} if e.found else None
    name = None
    if data is not None:
        given = data.get("name")
        name = given if isinstance(given, str) and given.strip() else path.stem
    _IMAGE_NAMES[path] = (stat.st_mtime_ns, stat.st_size, name)
    return name


def embedding_files(folders: list[Path]) -> dict[str, Path]:
    """Name -> file of every embedding under ``folders``: tensor files by stem (``files_by_stem``), and
    images holding an embedding (``io.embedding_image``; A1111's ``*.preview.png`` cards are pictures of
    one, skipped) by the embedding's name. A tensor file wins over an image of the same name, an earlier
    folder over a later one."""
    out = files_by_stem(folders, EMBEDDING_SUFFIXES)
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.lower().endswith(".preview"):
                continue
            try:
                name = image_embedding_name(path) if path.is_file() else None
            except OSError:  # removed or unreadable while listing
                continue
            if name is not None:
                out.setdefault(name, path)
    return out


_ALIASES: dict[Path, tuple[float, int, str | None]] = {}  # file -> (mtime, size, ss_output_name): headers read once


def lora_aliases(folders: list[Path]) -> dict[str, Path]:
    """A1111's aliases of the ``.safetensors`` LoRA files under ``folders`` (``lora_alias``). As A1111 fills
    its alias map file by file, a later file with the same alias wins."""
    out: dict[str, Path] = {}
    for path in files_by_stem(folders, (".safetensors",)).values():
        alias = lora_alias(path)
        if alias:
            out[alias] = path
    return out


def lora_alias(path: Path) -> str | None:
    """A LoRA file's alias in A1111: the ``ss_output_name`` of a ``.safetensors`` file's metadata (its header
    only, validated, read once per file version; a file that cannot be read has none)."""
    from latentforge.io.tensorfile import CheckpointError, SafetensorsFile

    try:
        stat = path.stat()
    except OSError:
        return None
    known = _ALIASES.get(path)
    if known is None or known[:2] != (stat.st_mtime, stat.st_size):
        alias = None
        if path.suffix.lower() == ".safetensors":
            try:
                f = SafetensorsFile(path)
                try:
                    alias = f.metadata.get("ss_output_name") or None
                finally:
                    f.close()
            except (CheckpointError, OSError, ValueError):
                pass
        known = _ALIASES[path] = (stat.st_mtime, stat.st_size, alias)
    return known[2]


def default_bundled() -> list[Path]:
    """The bundled demo adapters' folder, when this installation has it."""
    folder = bundled_adapters_folder()
    return [folder] if folder is not None else []


@dataclass
class AdapterFolders:
    """The folders searched for LoRA files (``lora``) and textual-inversion embeddings (``embeddings``);
    ``bundled``: searched after them for LoRAs, embeddings and ControlNets (empty it to switch that off)."""

    lora: list[Path] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)
    hypernetworks: list[Path] = field(default_factory=list)
    controlnet: list[Path] = field(default_factory=list)
    annotators: list[Path] = field(default_factory=list)  # ControlNet preprocessor models (HED), models/hed_load.py
    vae: list[Path] = field(default_factory=list)  # standalone VAEs (Pipeline.set_vae by name)
    bundled: list[Path] = field(default_factory=default_bundled)

    def bundled_for(self, kind: str) -> list[Path]:
        """The bundled folders' subfolders of one kind ("lora", "embeddings", "controlnet")."""
        return [Path(b) / kind for b in self.bundled if (Path(b) / kind).is_dir()]

    def add_models_dir(self, root: str | Path) -> None:
        """Add the LoRA, embedding, hypernetwork, ControlNet and VAE folders of an A1111 or ComfyUI installation
        (or its models folder)."""
        root = Path(root)
        lora = ["models/Lora", "models/LyCORIS", "models/loras", "Lora", "LyCORIS", "loras"]
        emb = ["embeddings", "models/embeddings"]
        hyper = ["models/hypernetworks", "hypernetworks"]
        found_lora = [root / p for p in lora if (root / p).is_dir()]
        found_emb = [root / p for p in emb if (root / p).is_dir()]
        found_hyper = [root / p for p in hyper if (root / p).is_dir()]
        control = ["models/ControlNet", "models/controlnet", "ControlNet", "controlnet"]
        found_control = [root / p for p in control if (root / p).is_dir()]
        found_vae = [root / p for p in ("models/VAE", "models/vae", "VAE", "vae") if (root / p).is_dir()]
        annotators = root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
        if annotators.is_dir() and annotators not in self.annotators:
            self.annotators.append(annotators)
        if not found_lora and not found_emb and not found_hyper and not found_control and not found_vae:
            raise FileNotFoundError(
                f"{root} has none of the folders of an A1111 ({', '.join(lora[:2])}, embeddings) or ComfyUI "
                "(models/loras, models/embeddings) installation; give the installation's root folder"
            )
        self.lora += [p for p in found_lora if p not in self.lora]
        self.embeddings += [p for p in found_emb if p not in self.embeddings]
        self.hypernetworks += [p for p in found_hyper if p not in self.hypernetworks]
        self.controlnet += [p for p in found_control if p not in self.controlnet]
        self.vae += [p for p in found_vae if p not in self.vae]

    def vae_files(self) -> dict[str, Path]:
        """The standalone VAEs of ``vae`` by file name (A1111's names: "vae-ft-mse.safetensors"; x.pt and
        x.safetensors are two VAEs), the first folder winning a name."""
        out: dict[str, Path] = {}
        for folder in self.vae:
            for path in sorted(Path(folder).rglob("*")):
                if path.suffix.lower() in VAE_SUFFIXES and path.is_file():
                    out.setdefault(path.name, path)
        return out

    def find_vae(self, name: str) -> Path:
        """A standalone VAE by file name or stem (or a path to a file or diffusers VAE folder)."""
        path = Path(name)
        if path.is_dir() or (path.suffix.lower() in VAE_SUFFIXES and path.is_file()):
            return path
        files = self.vae_files()
        if name in files:
            return files[name]
        return find(name, self.vae, VAE_SUFFIXES, "VAE", "--vae-dir or --models-dir (pipe.folders.vae)")

    def find_controlnet(self, name: str) -> Path:
        """A ControlNet model by file stem (or a path to a file); A1111's " [hash]" suffix is ignored."""
        name = re.sub(r" \[[0-9a-fA-F]{8,10}\]$", "", name)
        return find(
            name,
            self.controlnet,
            CONTROLNET_SUFFIXES,
            "ControlNet",
            "--controlnet-dir or --models-dir (pipe.folders.controlnet)",
            self.bundled_for("controlnet"),
        )

    def find_hypernetwork(self, name: str) -> Path:
        """An A1111 hypernetwork by file stem (or a path to a file)."""
        return find(
            name,
            self.hypernetworks,
            HYPERNETWORK_SUFFIXES,
            "hypernetwork",
            "--hypernetwork-dir or --models-dir (pipe.folders.hypernetworks)",
        )

    def find_lora(self, name: str) -> Path:
        """A LoRA by file stem (or a path to a file), else by its alias: the ``ss_output_name`` in a
        ``.safetensors`` file's metadata, as A1111 looks networks up by name, then by alias (its default is
        to write the alias into prompts, so infotexts name LoRAs that way)."""
        how = "--lora-dir or --models-dir (pipe.folders.lora in Python)"
        try:
            return find(name, self.lora, LORA_SUFFIXES, "LoRA", how, self.bundled_for("lora"))
        except AdapterNotFound:
            aliased = lora_aliases([*self.lora, *self.bundled_for("lora")]).get(name)
            if aliased is None:
                raise
            return aliased

    def find_embedding(self, name: str) -> Path:
        """An embedding by name (``embedding_files``) or a path to a file."""
        return find(
            name,
            self.embeddings,
            EMBEDDING_SUFFIXES + IMAGE_SUFFIXES,
            "embedding",
            "--embeddings-dir or --models-dir (pipe.folders.embeddings)",
            self.bundled_for("embeddings"),
            lister=embedding_files,
        )


def find(
    name: str,
    folders: list[Path],
    suffixes: tuple[str, ...],
    kind: str,
    how: str,
    fallback: list[Path] = (),
    lister: Callable[[list[Path]], dict[str, Path]] | None = None,
) -> Path:
    """A file by path, else by name in ``folders`` (exact, then case-insensitive), else in ``fallback``.
    Names are file stems, or what ``lister`` gives (name -> file)."""
    path = Path(name)
    if path.suffix.lower() in suffixes and path.is_file():
        return path
    lister = lister or (lambda where: files_by_stem(where, suffixes))
    files = lister(folders)
    found = _by_name(name, files)
    if found is None and fallback:
        found = _by_name(name, lister(list(fallback)))
    if found is not None:
        return found
    if not folders:
        raise AdapterNotFound(f"{kind} {name!r}: no {kind} folder is set; give one with {how}, or a file path")
    close = difflib.get_close_matches(name, list(files), n=5, cutoff=0.5)
    where = ", ".join(str(f) for f in folders)
    hint = f"; close names: {', '.join(close)}" if close else f"; {len(files)} {kind} files are there"
    raise AdapterNotFound(f"{kind} {name!r} is not in {where}{hint}")


def _by_name(name: str, files: dict[str, Path]) -> Path | None:
    if name in files:
        return files[name]
    return {k.lower(): v for k, v in files.items()}.get(name.lower())
