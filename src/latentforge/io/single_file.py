"""Single-file checkpoints (``.safetensors`` / ``.ckpt``) in the original LDM/SGM layout.

Components live under fixed prefixes: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE)
and one prefix per text encoder (see ``TextEncoderSpec.prefix``). Tensors that belong to none of them
(noise-schedule buffers, ``logit_scale``, ...) are kept as *extras* and written back on save, so a
load/save round trip gives identical tensors; ``model_ema.*`` copies are dropped and reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from latentforge.convert import openclip
from latentforge.families import Family, TextEncoderSpec, families
from latentforge.families.base import Signature
from latentforge.families.detect import PredictionHint, parse_prediction, read_sidecar
from latentforge.families.infer import infer_text_config, infer_unet_config, infer_vae_config, make_signature
from latentforge.io.components import Ref, identity_refs
from latentforge.io.tensorfile import CheckpointError, TensorFile, open_tensor_file, short
from latentforge.io.writer import write_safetensors
from latentforge.models.clip import TextEncoderConfig
from latentforge.models.unet import UNetConfig
from latentforge.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
DROPPED_PREFIXES = ("model_ema.",)
# keys under a text-encoder prefix that the text transformer has no place for
_TEXT_SIDE_KEYS = ("embeddings.position_ids", "logit_scale")


def _text_slots() -> dict[str, str]:
    return {spec.prefix: spec.style for fam in families() for spec in fam.text}


def _text_present(keys: set[str], prefix: str, style: str) -> bool:
    if style == "openclip":
        return prefix + "token_embedding.weight" in keys
    return any(prefix + p + "embeddings.token_embedding.weight" in keys for p in ("text_model.", ""))


def guess_file_kind(keys: list[str]) -> str | None:
    """A hint for files that are not full checkpoints."""
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA file (use it with a base model, not as the model)"
    if "string_to_param" in keys or "emb_params" in keys or {"clip_l", "clip_g"} <= set(keys):
        return "a textual-inversion embedding"
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in", "first_stage_model.encoder")) for k in keys) and not any(
        k.startswith(UNET_PREFIX) for k in keys
    ):
        return "a standalone VAE file (pass it as vae=... / --vae)"
    if any(k.startswith(("input_hint_block", "control_model.")) for k in keys):
        return "a ControlNet"
    return None


class SingleFileSource:
    layout = "single"

    def __init__(self, path: str | Path, file: TensorFile | None = None):
        self.path = Path(path)
        self.file: TensorFile = file if file is not None else open_tensor_file(self.path)
        self.keys = self.file.keys()
        self._keyset = set(self.keys)
        self.sidecar = read_sidecar(self.path)
        self._claimed: set[str] = set()

    @property
    def name(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _about(self, what: str) -> Iterator[None]:
        """Name the file and component in errors from architecture inference (which sees only shapes)."""
        try:
            yield
        except CheckpointError as e:
            raise type(e)(f"{self.path}: {what}: {e}") from None

    def _shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return {k[len(prefix) :]: self.file.shape(k) for k in self.keys if k.startswith(prefix)}

    def signature(self) -> Signature:
        from latentforge.families.detect import DetectionError

        unet = self._shapes(UNET_PREFIX)
        if not unet:
            kind = guess_file_kind(self.keys)
            hint = f"; it looks like {kind}" if kind else ""
            raise DetectionError(f"{self.path} holds no UNet weights ({UNET_PREFIX}*){hint}")
        text = tuple(p for p, style in _text_slots().items() if _text_present(self._keyset, p, style))
        with self._about("structure"):
            return make_signature(unet, self._shapes(VAE_PREFIX), text)

    def prediction_hints(self) -> list[PredictionHint]:
        hints = []
        if self.sidecar and self.sidecar.prediction:
            hints.append(PredictionHint(self.sidecar.prediction, f"sidecar config {self.sidecar.path.name}"))
        meta = getattr(self.file, "metadata", {}) or {}
        for key in ("latentforge.prediction", "modelspec.prediction_type"):
            if key in meta:
                try:
                    prediction = parse_prediction(meta[key])
                except ValueError as e:
                    raise CheckpointError(f"{self.path}: metadata {key}: {e}") from None
                hints.append(PredictionHint(prediction, f"file metadata {key}={short(meta[key])}"))
        if "v_pred" in self._keyset:
            hints.append(PredictionHint("v", "the file's 'v_pred' key"))
        return hints

    # --- components ------------------------------------------------------------------------------

    def unet(self, family: Family) -> tuple[UNetConfig, dict[str, Ref]]:
        policy = family.unet
        if self.sidecar and (self.sidecar.head_channels or self.sidecar.num_heads):
            import dataclasses

            policy = dataclasses.replace(
                policy,
                head_channels=self.sidecar.head_channels,
                num_heads=None if self.sidecar.head_channels else self.sidecar.num_heads,
            )
        refs = identity_refs(self.file, UNET_PREFIX, self.keys)
        self._claimed.update(UNET_PREFIX + k for k in refs)
        with self._about("UNet"):
            return infer_unet_config(self._shapes(UNET_PREFIX), policy), refs

    def vae(self, family: Family) -> tuple[VAEConfig, dict[str, Ref]]:
        refs = identity_refs(self.file, VAE_PREFIX, self.keys)
        self._claimed.update(VAE_PREFIX + k for k in refs)
        with self._about("VAE"):
            return infer_vae_config(self._shapes(VAE_PREFIX), family.vae), refs

    def text(self, spec: TextEncoderSpec) -> tuple[TextEncoderConfig, dict[str, Ref]]:
        with self._about(f"text encoder {spec.name}"):
            refs = text_refs(self.file, spec, [k for k in self.keys if k.startswith(spec.prefix)])
            self._claimed.update(ref.key for ref in refs.values())
            return infer_text_config({k: r.shape for k, r in refs.items()}, spec), refs

    def tokenizer_folder(self, spec: TextEncoderSpec) -> Path | None:
        return None

    def leftovers(self) -> tuple[dict[str, Tensor], list[str]]:
        """(extras read into memory, dropped keys): the tensors no component claimed."""
        extras, dropped = {}, []
        for k in self.keys:
            if k in self._claimed:
                continue
            if k.startswith(DROPPED_PREFIXES):
                dropped.append(k)
            else:
                extras[k] = self.file.read(k)
        return extras, dropped

    def close(self) -> None:
        self.file.close()


def text_refs(file: TensorFile, spec: TextEncoderSpec, keys: list[str]) -> dict[str, Ref]:
    """Refs in Hugging Face names for one text encoder stored under ``spec.prefix``."""
    refs: dict[str, Ref] = {}
    for key in keys:
        local = key[len(spec.prefix) :]
        if spec.style == "hf":
            local = local.removeprefix("text_model.")
            if local in _TEXT_SIDE_KEYS or (local.startswith("text_projection") and not spec.pooled):
                continue
            refs[local] = Ref(file, key, file.shape(key))
            continue
        if local in openclip.UNUSED or (local == "text_projection" and not spec.pooled):
            continue
        try:
            names = openclip.to_hf(local)
        except KeyError:  # not an OpenCLIP text key: the strict check reports it as unexpected
            refs[f"<file key> {key}"] = Ref(file, key, file.shape(key))
            continue
        for hf_key, third in names:
            shape = list(file.shape(key))
            if third is not None and shape:
                shape[0] //= 3
            elif local == "text_projection":
                shape = shape[::-1]
            refs[hf_key] = Ref(file, key, tuple(shape), partial(openclip.transform, local, third=third))
    return refs


def single_file_state(pipe, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The pipeline's weights in the original single-file layout (prefixes, OpenCLIP names)."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out: dict[str, Tensor] = {}
    for k, t in pipe.unet.state_dict().items():
        out[UNET_PREFIX + k] = cast(t)
    for k, t in pipe.vae.state_dict().items():
        out[VAE_PREFIX + k] = cast(t)
    for spec, enc in zip(pipe.family.text, pipe.text_encoders):
        state = pad_layers(enc.state_dict(), enc.config)
        if spec.style == "openclip":
            state = openclip.from_hf(state)
            out.update({spec.prefix + k: cast(t) for k, t in state.items()})
        else:
            for k, t in state.items():
                name = k if k.startswith("text_projection") else "text_model." + k
                out[spec.prefix + name] = cast(t)
    for k, t in pipe.extras.items():
        out.setdefault(k, cast(t))
    return out


def pad_layers(state: dict[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    """Restore the original layer count of an encoder stored truncated (a diffusers SD2 text encoder):
    the missing last layers, which the family never uses, are written as zeros so every loader sees the
    original layout."""
    if not cfg.dropped_layers:
        return state
    state = dict(state)
    last = cfg.layers - 1
    for k, t in list(state.items()):
        if k.startswith(f"encoder.layers.{last}."):
            for extra in range(cfg.layers, cfg.layers + cfg.dropped_layers):
                state[k.replace(f"encoder.layers.{last}.", f"encoder.layers.{extra}.")] = torch.zeros_like(t)
    return state


def save_single_file(
    pipe,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    meta = {"format": "pt", "latentforge.family": pipe.family.name, "latentforge.prediction": pipe.prediction}
    meta.update(metadata or {})
    return write_safetensors(single_file_state(pipe, dtype), path, metadata=meta, overwrite=overwrite)
