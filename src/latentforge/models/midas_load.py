"""Loading MiDaS DPT-Hybrid from its two file layouts, and finding the file.

1. The original MiDaS checkpoint ``dpt_hybrid-midas-501f0c75.pt`` (isl-org/DPT release 1_0; what A1111
   keeps in ``models/midas/``): a pickled state dict with keys ``pretrained.model.*`` (the timm
   ``vit_base_resnet50_384`` with its BiT backbone under ``patch_embed.backbone``), ``pretrained.
   act_postprocess{3,4}.*`` and ``scratch.*``. Our module names are these names, so the table is the
   identity; the ViT's ImageNet classifier (``pretrained.model.head.*``) is in the file and unused. The
   file records no head count, norm groups or tapped blocks: the released model's values are used (64
   channels per head, 32 groups, blocks at 3/4 depth and the last).
2. The transformers ``DPTForDepthEstimation`` layout (``Intel/dpt-hybrid-midas``; the ``depth_estimator/``
   folder of a diffusers ``stable-diffusion-2-depth``): ``config.json`` plus ``model.safetensors`` or
   ``pytorch_model.bin``, keys ``dpt.embeddings.*``, ``dpt.encoder.layer.N.*``, ``neck.*``, ``head.head.*``;
   one table, ``transformers_name``, with q, k and v stored separately.

Pickles are opened only with ``torch.load(weights_only=True)`` (``io.tensorfile``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from latentforge.io.components import Ref, build
from latentforge.io.tensorfile import CheckpointError, TensorFile, open_tensor_file
from latentforge.models.annotator_files import first_found, refuse_extra_tensors
from latentforge.models.midas import DPTHybrid, MidasConfig

MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"
MIDAS_URL = "https://github.com/intel-isl/DPT/releases/download/1_0/dpt_hybrid-midas-501f0c75.pt"
# In the original file and not part of the depth model.
ORIGINAL_UNUSED = ("pretrained.model.head.weight", "pretrained.model.head.bias")
_HF_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


class MidasNotFoundError(FileNotFoundError):
    """The depth model file is not where it was looked for; the message says what to get and where to put it."""


# --- the transformers layout: one table, our (= original) name -> transformers name ---------------------

_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_FIXED = {
    "pretrained.model.patch_embed.backbone.stem.conv": "dpt.embeddings.backbone.bit.embedder.convolution",
    "pretrained.model.patch_embed.backbone.stem.norm": "dpt.embeddings.backbone.bit.embedder.norm",
    "pretrained.model.patch_embed.proj": "dpt.embeddings.projection",
    "pretrained.model.cls_token": "dpt.embeddings.cls_token",
    "pretrained.model.pos_embed": "dpt.embeddings.position_embeddings",
    "pretrained.model.norm": "dpt.layernorm",
    "pretrained.act_postprocess3.0.project.0": "neck.reassemble_stage.readout_projects.2.0",
    "pretrained.act_postprocess4.0.project.0": "neck.reassemble_stage.readout_projects.3.0",
    "pretrained.act_postprocess3.3": "neck.reassemble_stage.layers.2.projection",
    "pretrained.act_postprocess4.3": "neck.reassemble_stage.layers.3.projection",
    "pretrained.act_postprocess4.4": "neck.reassemble_stage.layers.3.resize",
}
_FUSION = {"out_conv": "projection", "resConfUnit1": "residual_layer1", "resConfUnit2": "residual_layer2"}


def transformers_name(key: str) -> str | tuple[str, str, str]:
    """Our parameter name (the original checkpoint's) -> its transformers ``DPTForDepthEstimation`` name.

    A fused ``attn.qkv`` parameter maps to the (query, key, value) names, concatenated in that order.
    """
    module, _, param = key.rpartition(".")
    if module in _FIXED:
        return f"{_FIXED[module]}.{param}"
    if key in _FIXED:  # cls_token, pos_embed (parameters of the ViT itself)
        return _FIXED[key]
    if m := re.fullmatch(r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        return f"dpt.embeddings.backbone.bit.encoder.stages.{m[1]}.layers.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.(.+)\.(weight|bias)", key):
        base = f"dpt.encoder.layer.{m[1]}"
        if m[2] == "attn.qkv":
            return tuple(f"{base}.attention.attention.{n}.{m[3]}" for n in ("query", "key", "value"))  # type: ignore[return-value]
        return f"{base}.{_BLOCK[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"scratch\.layer(\d)_rn\.weight", key):
        return f"neck.convs.{int(m[1]) - 1}.weight"
    if m := re.fullmatch(r"scratch\.refinenet(\d)\.(\w+)(.*)", key):
        rest = m[3].replace(".conv1.", ".convolution1.").replace(".conv2.", ".convolution2.")
        return f"neck.fusion_stage.layers.{4 - int(m[1])}.{_FUSION[m[2]]}{rest}"
    if key.startswith("scratch.output_conv."):
        return "head.head." + key[len("scratch.output_conv.") :]
    raise KeyError(key)


# --- configurations ------------------------------------------------------------------------------------


def config_from_original(file: TensorFile, source: str) -> MidasConfig:
    """The sizes of an original-layout file, read from its tensor shapes."""
    keys = set(file.keys())

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise CheckpointError(f"{source} has no {key!r}: it is not a complete MiDaS DPT-Hybrid checkpoint")
        return file.shape(key)

    vit, bb = "pretrained.model.", "pretrained.model.patch_embed.backbone."
    layers = 1 + max((int(m[1]) for k in keys if (m := re.match(r"pretrained\.model\.blocks\.(\d+)\.", k))), default=-1)
    stages = 1 + max((int(m[1]) for k in keys if (m := re.match(re.escape(bb) + r"stages\.(\d+)\.", k))), default=-1)
    depths = tuple(
        1 + max(int(m[1]) for k in keys if (m := re.match(re.escape(bb) + rf"stages\.{s}\.blocks\.(\d+)\.", k)))
        for s in range(stages)
    )
    if layers < 2 or stages != 3:
        raise CheckpointError(
            f"{source} is not a DPT-Hybrid checkpoint: it has {layers} transformer blocks and {stages} ResNet "
            "stages (DPT-Hybrid: 12 and 3); only MiDaS v3 DPT-Hybrid (dpt_hybrid-midas-501f0c75.pt) is supported"
        )
    tokens, hidden = shape(vit + "pos_embed")[1:]
    grid = math.isqrt(tokens - 1)
    return MidasConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        mlp_size=shape(vit + "blocks.0.mlp.fc1.weight")[0],
        layer_norm_eps=1e-6,  # timm's ViT
        stem_width=shape(bb + "stem.conv.weight")[0],
        stage_widths=tuple(shape(bb + f"stages.{s}.blocks.0.conv3.weight")[0] for s in range(3)),
        stage_depths=depths,
        hooks=(3 * layers // 4 - 1, layers - 1),
        neck_widths=(
            shape("pretrained.act_postprocess3.3.weight")[0],
            shape("pretrained.act_postprocess4.3.weight")[0],
        ),
        fusion_width=shape("scratch.layer1_rn.weight")[0],
        head_width=shape("scratch.output_conv.2.weight")[0],
        grid=grid,
    )


def _need(cfg: dict, name: str, ok: bool, want: str, source: str) -> None:
    if not ok:
        raise CheckpointError(
            f"{source}: {name} = {cfg.get(name)!r} is not supported (DPT-Hybrid needs {want}); this config.json "
            "is not a MiDaS DPT-Hybrid depth model"
        )


def config_from_transformers(cfg: dict, source: str) -> MidasConfig:
    """A transformers ``DPTConfig`` (config.json; missing fields take transformers' defaults) -> MidasConfig."""
    bit = dict(cfg.get("backbone_config") or {})
    hybrid = cfg.get("is_hybrid") is True or cfg.get("embedding_type") == "hybrid"  # the latter: early configs
    _need(cfg, "is_hybrid", hybrid, "true", source)
    _need(cfg, "readout_type", cfg.get("readout_type", "project") == "project", '"project"', source)
    _need(cfg, "hidden_act", cfg.get("hidden_act", "gelu") == "gelu", '"gelu"', source)
    _need(cfg, "qkv_bias", cfg.get("qkv_bias", True) is True, "true", source)
    _need(cfg, "add_projection", not cfg.get("add_projection", False), "false", source)
    _need(cfg, "use_batch_norm_in_fusion_residual", not cfg.get("use_batch_norm_in_fusion_residual"), "false", source)
    _need(cfg, "use_bias_in_fusion_residual", cfg.get("use_bias_in_fusion_residual") in (None, True), "true", source)
    _need(cfg, "head_in_index", cfg.get("head_in_index", -1) == -1, "-1", source)
    factors = list(cfg.get("reassemble_factors", [4, 2, 1, 0.5]))
    _need(cfg, "reassemble_factors", factors[2:] == [1, 0.5], "[..., ..., 1, 0.5]", source)
    _need(cfg, "patch_size", cfg.get("patch_size", 16) in (16, [16, 16]), "16 (the ResNet stride)", source)
    _need(
        bit,
        "layer_type",
        bit.get("layer_type", "bottleneck") == "bottleneck",
        '"bottleneck"',
        source + " backbone_config",
    )
    _need(
        bit,
        "global_padding",
        str(bit.get("global_padding", "same")).lower() == "same",
        '"same"',
        source + " backbone_config",
    )
    _need(bit, "embedding_dynamic_padding", bit.get("embedding_dynamic_padding", True) is True, "true", source)
    _need(bit, "width_factor", bit.get("width_factor", 1) == 1, "1", source + " backbone_config")
    widths = tuple(bit.get("hidden_sizes", (256, 512, 1024, 2048)))[:3]
    depths = tuple(bit.get("depths", (3, 4, 9)))
    _need(bit, "depths", len(depths) == 3, "3 stages", source + " backbone_config")
    neck = tuple(cfg.get("neck_hidden_sizes", (96, 192, 384, 768)))
    _need(
        cfg, "neck_hidden_sizes", len(neck) == 4 and neck[:2] == widths[:2], f"[{widths[0]}, {widths[1]}, a, b]", source
    )
    outs = tuple(cfg.get("backbone_out_indices", (2, 5, 8, 11)))
    image = cfg.get("image_size", 384)
    image = image[0] if isinstance(image, (list, tuple)) else image
    return MidasConfig(
        hidden_size=cfg.get("hidden_size", 768),
        num_layers=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12),
        mlp_size=cfg.get("intermediate_size", 3072),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        stem_width=bit.get("embedding_size", 64),
        stage_widths=widths,
        stage_depths=depths,
        norm_groups=bit.get("num_groups", 32),
        hooks=(int(outs[2]), int(outs[3])),
        neck_widths=(neck[2], neck[3]),
        fusion_width=cfg.get("fusion_hidden_size", 256),
        head_width=32,  # fixed in DPTDepthEstimationHead
        grid=image // 16,
    )


# --- files ---------------------------------------------------------------------------------------------


def _layout(file: TensorFile, source: str) -> str:
    keys = file.keys()
    if any(k.startswith("pretrained.model.") for k in keys):
        return "original"
    if any(k.startswith("dpt.embeddings.") for k in keys):
        return "transformers"
    shown = ", ".join(keys[:5]) or "no tensors"
    raise CheckpointError(
        f"{source} is not a MiDaS DPT-Hybrid depth model in a known layout (its keys begin: {shown}). Expected "
        f"the original {MIDAS_FILE} (keys pretrained.model.*, scratch.*) or a transformers DPTForDepthEstimation "
        "folder (config.json with model.safetensors; keys dpt.*, neck.*, head.*)"
    )


def _hf_weights(folder: Path) -> TensorFile:
    for name in _HF_WEIGHTS:
        if (folder / name).is_file():
            return open_tensor_file(folder / name)
    raise CheckpointError(f"{folder} has a config.json but no weights ({' or '.join(_HF_WEIGHTS)})")


def _refs(
    file: TensorFile, model_keys: Iterable[tuple[str, tuple[int, ...]]], layout: str, source: str
) -> dict[str, Ref]:
    """Refs for every model parameter; file tensors that nothing uses are an error naming them."""
    refs: dict[str, Ref] = {}
    used: set[str] = set(ORIGINAL_UNUSED) if layout == "original" else set()
    for key, shape in model_keys:
        name = key if layout == "original" else transformers_name(key)
        if isinstance(name, tuple):
            q, k, v = name
            if all(n in file.keys() for n in name):
                refs[key] = Ref(
                    file,
                    q,
                    shape,
                    transform=lambda t, k=k, v=v: torch.cat([t, file.read(k, t.dtype), file.read(v, t.dtype)]),
                )
            used.update(name)
        else:
            if name in file.keys():
                refs[key] = Ref(file, name, file.shape(name))
            used.add(name)
    refuse_extra_tensors(
        source,
        sorted(set(file.keys()) - used),
        what="MiDaS DPT-Hybrid",
        layout=layout,
        advice="The file is a different model (DPT-Large, MiDaS v2.1, a segmentation head?) or damaged; use "
        f"{MIDAS_FILE} or a transformers Intel/dpt-hybrid-midas folder",
    )
    return refs


def load_midas(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: MidasConfig | None = None,
) -> DPTHybrid:
    """Load DPT-Hybrid from the original ``.pt`` file, a transformers folder (config.json + weights), or a
    diffusers depth2img folder (its ``depth_estimator/``). ``config`` overrides what the file says."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "depth_estimator").is_dir():
        path = path / "depth_estimator"
    if not path.exists():
        raise MidasNotFoundError(f"{path} does not exist. {_where_to_get()}")
    source = str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a folder without config.json: expected a transformers DPTForDepthEstimation folder, a "
                f"diffusers depth2img folder with depth_estimator/, or the file {MIDAS_FILE} itself"
            )
        file = _hf_weights(path)
        source = str(getattr(file, "path", path))
    else:
        file = open_tensor_file(path)
    try:
        layout = _layout(file, source)
        if config is None:
            if layout == "original":
                config = config_from_original(file, source)
            else:
                cfg_path = (path if path.is_dir() else path.parent) / "config.json"
                try:
                    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as e:
                    raise CheckpointError(
                        f"{source} is in the transformers layout, which needs its config.json beside it; "
                        f"{cfg_path} could not be read ({e})"
                    ) from None
                config = config_from_transformers(raw, str(cfg_path))
        cfg = config
        with torch.device("meta"):
            expected = [(k, tuple(v.shape)) for k, v in DPTHybrid(cfg).state_dict().items()]
        refs = _refs(file, expected, layout, source)
        model = build(lambda: DPTHybrid(cfg), refs, dtype=dtype, device=device, what="MiDaS DPT-Hybrid", source=source)
    finally:
        file.close()
    return model  # type: ignore[return-value]


def _where_to_get() -> str:
    return (
        f"Stable Diffusion 2 depth-to-image needs the depth model MiDaS DPT-Hybrid: download {MIDAS_FILE} from "
        f"{MIDAS_URL} and put it in the WebUI's models/midas/ folder (A1111's place for it), or pass its path; "
        "a diffusers stable-diffusion-2-depth folder has it in depth_estimator/ (transformers layout)"
    )


def midas_candidates(model_path: str | Path | None = None, dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Where the depth model is looked for, in order: ``<model folder>/depth_estimator`` (a diffusers
    depth2img folder), then for a single-file model in ``<webui>/models/Stable-diffusion/`` the A1111
    place ``<webui>/models/midas/`` and the checkpoint's own folder, then each of ``dirs``."""
    out: list[Path] = []
    if model_path is not None:
        p = Path(model_path)
        if p.is_dir():
            out.append(p / "depth_estimator")
        else:
            out += [p.parent.parent / "midas" / MIDAS_FILE, p.parent / "midas" / MIDAS_FILE, p.parent / MIDAS_FILE]
    for d in dirs:
        d = Path(d)
        out += [d / MIDAS_FILE, d / "midas" / MIDAS_FILE]
    return out


def find_midas(model_path: str | Path | None = None, dirs: Iterable[str | Path] = ()) -> Path:
    """The first existing place of ``midas_candidates``; MidasNotFoundError says how to get it (the folders
    searched are logged, not in the message: ``annotator_files.first_found``)."""
    return first_found(
        midas_candidates(model_path, dirs),
        what="depth model",
        how_to_get=_where_to_get(),
        error=MidasNotFoundError,
        found=lambda p: (p.is_dir() and (p / "config.json").is_file()) or p.is_file(),
    )


__all__ = [
    "MIDAS_FILE",
    "MIDAS_URL",
    "MidasNotFoundError",
    "config_from_original",
    "config_from_transformers",
    "find_midas",
    "load_midas",
    "midas_candidates",
    "transformers_name",
]
