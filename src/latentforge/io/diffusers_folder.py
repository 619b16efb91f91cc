"""Diffusers folders: ``model_index.json`` plus one folder per component with ``config.json`` and weights.

A folder is untrusted input like a single file: its files are found and read through
``io.folder_files`` (each must resolve inside the folder), and each config value is checked
(``convert.diffusers``, ``models.limits``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import Tensor

from latentforge.convert import diffusers as dconv
from latentforge.families import Family, TextEncoderSpec
from latentforge.families.base import Signature, config_signature
from latentforge.families.detect import PredictionHint, parse_prediction
from latentforge.io.components import Ref
from latentforge.io.folder_files import (
    MAX_JSON_BYTES,
    exists,
    inside,
    open_component_weights,
    read_json,
)
from latentforge.io.tensorfile import CheckpointError, TensorFile, regular_file, short
from latentforge.io.writer import atomic_dir, write_json, write_safetensors
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.limits import check_text_config
from latentforge.models.unet import UNet, UNetConfig
from latentforge.models.vae import AutoencoderKL, VAEConfig


def text_config_from_json(cfg: dict) -> TextEncoderConfig:
    """A transformers CLIPTextConfig ``config.json`` -> TextEncoderConfig; a CheckpointError naming the key
    for a missing, mistyped or out-of-range value."""
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"'architectures' is {short(archs)}; it must be a list of class names")
    with_proj = any("WithProjection" in a for a in archs)
    width = dconv.config_int(cfg, "hidden_size", limit="MAX_WIDTH")
    act = cfg.get("hidden_act", "quick_gelu")
    cfg_out = TextEncoderConfig(
        vocab_size=dconv.config_int(cfg, "vocab_size", 49408, limit="MAX_VOCAB"),
        max_positions=dconv.config_int(cfg, "max_position_embeddings", 77, limit="MAX_POSITIONS"),
        width=width,
        layers=dconv.config_int(cfg, "num_hidden_layers", limit="MAX_TEXT_LAYERS"),
        heads=dconv.config_int(cfg, "num_attention_heads", limit="MAX_HEADS"),
        mlp_width=dconv.config_int(cfg, "intermediate_size", limit="MAX_MLP"),
        activation=act,
        projection_dim=dconv.config_int(cfg, "projection_dim", width, limit="MAX_WIDTH") if with_proj else None,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
    )
    return check_text_config(cfg_out)


class DiffusersSource:
    layout = "diffusers"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index = read_json(self.path, "model_index.json") if exists(self.path / "model_index.json") else {}
        self._unet_cfg = self._config("unet", dconv.unet_config_from_diffusers)
        self._vae_cfg = self._config("vae", dconv.vae_config_from_diffusers)
        self._files: list[TensorFile] = []

    def _config(self, folder: str, convert):
        """``convert(folder/config.json)``, its errors prefixed with the file's path."""
        path = self.path / folder / "config.json"
        data = read_json(self.path, f"{folder}/config.json")
        try:
            return convert(data)
        except CheckpointError as e:
            raise type(e)(f"{path}: {e}") from None

    @property
    def name(self) -> str:
        return str(self.path)

    def _text_folders(self) -> dict[str, dict]:
        out = {}
        for folder in ("text_encoder", "text_encoder_2"):
            cfg_path = self.path / folder / "config.json"
            if exists(cfg_path):
                out[folder] = read_json(self.path, f"{folder}/config.json")
        return out

    def signature(self) -> Signature:
        text = tuple(
            f"{name}:{str(cfg.get('hidden_act', 'quick_gelu'))[:40]}" for name, cfg in self._text_folders().items()
        )
        return config_signature(self._unet_cfg, len(self._vae_cfg.channel_mult), text)

    def prediction_hints(self) -> list[PredictionHint]:
        path = self.path / "scheduler" / "scheduler_config.json"
        if exists(path):
            value = read_json(self.path, "scheduler/scheduler_config.json").get("prediction_type")
            if value:
                try:
                    prediction = parse_prediction(value) if isinstance(value, str) else None
                except ValueError:
                    prediction = None
                if prediction is None:
                    raise CheckpointError(
                        f"{path}: prediction_type is {short(value)}; expected 'epsilon' or 'v_prediction' "
                        "(or pass prediction='eps'/'v' to load)"
                    )
                return [PredictionHint(prediction, f"scheduler/scheduler_config.json prediction_type={value!r}")]
        return []

    def _open(self, folder: str) -> TensorFile:
        f = open_component_weights(self.path, folder)
        self._files.append(f)
        return f

    def unet(self, family: Family) -> tuple[UNetConfig, dict[str, Ref]]:
        levels = len(self._unet_cfg.channel_mult)
        cfg = dataclasses.replace(
            self._unet_cfg, cross_only=self._unet_cfg.cross_only or family.unet.cross_only[:levels]
        )
        f = self._open("unet")
        n = cfg.num_res_blocks
        return cfg, mapped_refs(f, lambda: UNet(cfg), lambda k: [dconv.unet_key(k, n)])

    def vae(self, family: Family) -> tuple[VAEConfig, dict[str, Ref]]:
        return self._vae_cfg, vae_refs_diffusers(self._open("vae"), self._vae_cfg)

    def text(self, spec: TextEncoderSpec) -> tuple[TextEncoderConfig, dict[str, Ref]]:
        try:
            cfg = text_config_from_json(self._text_folders()[spec.folder])
        except CheckpointError as e:
            raise CheckpointError(f"{self.path / spec.folder / 'config.json'}: {e}") from None
        cfg = dataclasses.replace(
            cfg,
            dropped_layers=spec.diffusers_dropped_layers,
            projection_dim=cfg.projection_dim if spec.pooled else None,
        )
        f = self._open(spec.folder)
        refs = {}
        for key in f.keys():
            local = key.removeprefix("text_model.")
            if local == "embeddings.position_ids" or (local.startswith("text_projection") and not spec.pooled):
                continue
            refs[local] = Ref(f, key, f.shape(key))
        return cfg, refs

    def tokenizer_folder(self, spec: TextEncoderSpec) -> Path | None:
        folder = self.path / spec.folder.replace("text_encoder", "tokenizer")
        names = ("vocab.json", "merges.txt")
        if not all(exists(folder / n) for n in names):
            return None
        for n in names:
            size = regular_file(inside(self.path, f"{folder.name}/{n}", "tokenizer file"))
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"{folder / n} is {size} bytes long; a tokenizer file is about 1 MB")
        return folder

    def leftovers(self) -> tuple[dict[str, Tensor], list[str]]:
        return {}, []

    def close(self) -> None:
        for f in self._files:
            f.close()


def mapped_refs(f: TensorFile, factory, names) -> dict[str, Ref]:
    """Refs for a module whose keys map to file keys by ``names(key) -> [candidate file keys]``.

    File keys that no module key claims are kept under their own name, so the strict check reports
    them as unexpected."""
    with torch.device("meta"):
        expected = factory().state_dict()
    refs: dict[str, Ref] = {}
    claimed = set()
    keys = set(f.keys())
    for key, t in expected.items():
        for cand in names(key):
            if cand in keys:
                shape = f.shape(cand)
                transform = None
                if len(shape) == 2 and t.ndim == 4:  # linear weights standing in for 1x1 convs
                    shape, transform = tuple(t.shape), _to_conv
                refs[key] = Ref(f, cand, shape, transform)
                claimed.add(cand)
                break
    for k in keys - claimed:
        refs[f"<file key> {k}"] = Ref(f, k, f.shape(k))
    return refs


def _to_conv(t: Tensor) -> Tensor:
    return t.reshape(*t.shape, 1, 1)


def vae_refs_diffusers(f: TensorFile, cfg: VAEConfig) -> dict[str, Ref]:
    levels = len(cfg.channel_mult)

    def names(k: str) -> list[str]:
        d = dconv.vae_key(k, levels)
        legacy = [d.replace(f".{new}.", f".{old}.") for new, old in dconv.VAE_LEGACY_ATTN.items() if f".{new}." in d]
        return [d, *legacy]

    return mapped_refs(f, lambda: AutoencoderKL(cfg), names)


# --- writing ---------------------------------------------------------------------------------------


def _tokenizer_files(tok, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(tok.encoder, folder / "vocab.json")
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    pad = tok.decoder[tok.pad_id]
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    write_json(special, folder / "special_tokens_map.json")
    write_json(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special},
        folder / "tokenizer_config.json",
    )


def truncate_layers(state: dict[str, Tensor], keep: int) -> dict[str, Tensor]:
    """Drop text-encoder layers ``keep`` and above."""
    out = {}
    for k, t in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.", k)
        if m is None or int(m.group(1)) < keep:
            out[k] = t
    return out


def _text_config_json(cfg: TextEncoderConfig, pad_id: int) -> dict:
    out = {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": pad_id,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }
    if cfg.projection_dim:
        out["projection_dim"] = cfg.projection_dim
    return out


def scheduler_config(family: Family, prediction: str) -> dict:
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": family.beta_start,
        "beta_end": family.beta_end,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "v_prediction" if prediction == "v" else "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def _model_folder(path: Path) -> str | None:
    """None for a folder --overwrite may replace: a diffusers model folder (``model_index.json``) or an empty
    one; else why not (a folder of other files, or a file, is the user's)."""
    if path.is_dir() and not path.is_symlink():
        if (path / "model_index.json").is_file() or not any(path.iterdir()):
            return None
        return "is a folder but no diffusers model folder (it has no model_index.json)"
    return "is not a folder"


def save_diffusers(pipe, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``pipe`` as a diffusers folder that diffusers' ``from_pretrained`` loads."""
    fam: Family = pipe.family

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    size = fam.default_size
    index: dict = {"_class_name": fam.diffusers_pipeline, "_diffusers_version": "0.30.0"}
    with atomic_dir(path, overwrite=overwrite, replaceable=_model_folder) as tmp:
        ucfg = pipe.unet.config
        time_dim = None
        if ucfg.adm_in_channels:
            pooled = next(enc.config.projection_dim for enc in pipe.text_encoders if enc.config.projection_dim)
            time_dim = (ucfg.adm_in_channels - pooled) // fam.conditioner.number_count
        (tmp / "unet").mkdir()
        write_json(
            dconv.unet_config_to_diffusers(ucfg, size // pipe.vae.config.downscale, time_dim),
            tmp / "unet" / "config.json",
        )
        n = ucfg.num_res_blocks
        write_safetensors(
            {dconv.unet_key(k, n): cast(t) for k, t in pipe.unet.state_dict().items()},
            tmp / "unet" / "diffusion_pytorch_model.safetensors",
        )
        (tmp / "vae").mkdir()
        vcfg = pipe.vae.config
        write_json(dconv.vae_config_to_diffusers(vcfg, pipe.vae.scale, size), tmp / "vae" / "config.json")
        levels = len(vcfg.channel_mult)
        vae_state = {}
        for k, t in pipe.vae.state_dict().items():
            vae_state[dconv.vae_key(k, levels)] = cast(t.reshape(t.shape[:2]) if dconv.is_vae_attn_matrix(k) else t)
        write_safetensors(vae_state, tmp / "vae" / "diffusion_pytorch_model.safetensors")
        index.update(unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"])
        for folder in ("text_encoder", "text_encoder_2"):
            index[folder] = [None, None]
            index[folder.replace("text_encoder", "tokenizer")] = [None, None]
        for spec, enc, tok in zip(fam.text, pipe.text_encoders, pipe.tokenizers):
            (tmp / spec.folder).mkdir()
            # diffusers stores some encoders without their last, unused layer(s)
            keep = enc.config.layers + enc.config.dropped_layers - spec.diffusers_dropped_layers
            state = {
                (k if k.startswith("text_projection") else "text_model." + k): cast(t)
                for k, t in truncate_layers(enc.state_dict(), keep).items()
            }
            tcfg = dataclasses.replace(enc.config, layers=min(keep, enc.config.layers))
            write_json(_text_config_json(tcfg, tok.pad_id), tmp / spec.folder / "config.json")
            write_safetensors(state, tmp / spec.folder / "model.safetensors")
            tok_folder = spec.folder.replace("text_encoder", "tokenizer")
            _tokenizer_files(tok, tmp / tok_folder)
            cls = "CLIPTextModelWithProjection" if enc.config.projection_dim else "CLIPTextModel"
            index[spec.folder] = ["transformers", cls]
            index[tok_folder] = ["transformers", "CLIPTokenizer"]
        (tmp / "scheduler").mkdir()
        write_json(scheduler_config(fam, pipe.prediction), tmp / "scheduler" / "scheduler_config.json")
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
        index.update({k: list(v) if isinstance(v, tuple) else v for k, v in fam.diffusers_extras})
        index.update(fam.conditioner.diffusers_index())
        write_json(index, tmp / "model_index.json")
    return Path(path)
