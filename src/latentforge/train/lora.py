"""LoRA training (Hu et al. 2021; LoCon for convolutions): factors on a frozen model, saved as kohya files.

Each trained layer gets a ``LoraFactors`` module registered as a parametrization of its weight, so every
forward sees ``W + delta`` where the delta is ``adapters.lora.delta`` of the factors: the same function
that merges a saved file at inference (one definition of the LoRA math). kohya's initialisation: ``down``
Kaiming-uniform, ``up`` zero, so training starts at the base model.

The file is in kohya's format (sd-scripts ``networks.lora``): ``<name>.lora_down.weight`` (rank, in[, k,
k]), ``<name>.lora_up.weight`` (out, rank[, 1, 1]), ``<name>.alpha``; names ``lora_unet_<diffusers path>``
(SD1/SD2) or ``lora_unet_<original path>`` (models with a vector input: SDXL, as kohya's SDXL scripts),
``lora_te_``/``lora_te1_``/``lora_te2_`` + the Hugging Face text-encoder path; metadata ``ss_*`` keys as
sd-scripts writes them (string values), which A1111 and ComfyUI show.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from latentforge.adapters.keys import model_index
from latentforge.adapters.lora import delta
from latentforge.convert.diffusers import unet_key
from latentforge.io.writer import write_safetensors
from latentforge.train.config import ConfigError, LoraConfig, TrainConfig, config_to_dict

_ATTENTION = (".attn1.", ".attn2.")


class LoraFactors(nn.Module):
    """The factors of one layer; as a parametrization it maps the frozen weight W to W + delta."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float, dropout: float, g: torch.Generator):
        super().__init__()
        out, inp, *kernel = weight_shape
        self.down = nn.Parameter(torch.empty(rank, inp, *kernel))
        self.up = nn.Parameter(torch.zeros(out, rank, *[1] * len(kernel)))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=g)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout = dropout
        self.mask: Tensor | None = None  # rank-dropout mask of the current micro-batch

    def forward(self, weight: Tensor) -> Tensor:
        down = self.down
        if self.training and self.mask is not None:
            down = down * self.mask.to(down.device).reshape(-1, *[1] * (down.dim() - 1))
        d = delta({"down": down, "up": self.up, "alpha": self.alpha}, weight.shape)
        return weight + d.to(weight.dtype)


def _selected(name: str, module: nn.Module, kind: str, cfg: LoraConfig) -> bool:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if kind == "text":
        return ".self_attn." in name or ".mlp." in name
    in_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
    if cfg.modules == "attention":
        return any(a in name for a in _ATTENTION)
    if in_transformer:
        return True
    if cfg.modules != "locon":
        return False
    # LoCon: residual blocks, down- and upsamplers (not the first and last convolutions, nor the embeddings)
    return any(p in name for p in (".in_layers.", ".out_layers.", ".emb_layers.", ".skip_connection", ".op", ".conv"))


class LoraNetwork(nn.Module):
    """The trained factors by kohya module name; ``attach`` makes them part of the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.factors = nn.ModuleDict()
        self.targets: dict[str, tuple[nn.Module, str]] = {}  # kohya name -> (layer, network name)
        self._attached = False

    def resample(self, g: torch.Generator) -> None:
        """Draw the rank-dropout masks of one micro-batch from ``g`` (so a resumed run draws the same)."""
        for f in self.factors.values():
            if f.dropout > 0:
                keep = (torch.rand(f.down.shape[0], generator=g) >= f.dropout).float()
                f.mask = keep / (1 - f.dropout)

    def attach(self) -> None:
        for name, f in self.factors.items():
            parametrize.register_parametrization(self.targets[name][0], "weight", f)
        self._attached = True

    def detach_from_model(self) -> None:
        """Take the parametrizations off: the layers hold their original weights again."""
        if self._attached:
            for layer, _ in self.targets.values():
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            self._attached = False


def kohya_names(pipe) -> dict[tuple[str, str], str]:
    """(network, module name) -> the kohya module name, for every Linear/Conv2d of the UNet and encoders."""
    nets = pipe.networks()
    sgm = bool(pipe.unet.config.adm_in_channels)
    nrb = pipe.unet.config.num_res_blocks
    out = {}
    for name, m in nets["unet"].named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            try:
                path = name if sgm else unet_key(f"{name}.weight", nrb).removesuffix(".weight")
            except KeyError:
                continue
            out[("unet", name)] = "lora_unet_" + path.replace(".", "_")
    encoders = [n for n in nets if n.startswith("text_encoder")]
    for i, network in enumerate(encoders):
        prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
        for name, m in nets[network].named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                out[(network, name)] = prefix + f"text_model.{name}".replace(".", "_")
    return out


def build_network(pipe, cfg: LoraConfig, seed: int = 0) -> LoraNetwork:
    """Factors for the selected layers of ``pipe`` (not yet attached), initialised from ``seed``. Each kohya
    name is checked to lead back to its layer through ``adapters.keys``, so the saved file loads onto the
    same layers."""
    g = torch.Generator().manual_seed(seed)
    nets = pipe.networks()
    names = kohya_names(pipe)
    index = model_index(nets, pipe.unet.config.num_res_blocks)
    net = LoraNetwork()
    for (network, module_name), kohya in names.items():
        if network != "unet" and not cfg.text_encoder:
            continue
        layer = nets[network].get_submodule(module_name)
        if not _selected(module_name, layer, "unet" if network == "unet" else "text", cfg):
            continue
        if index.get(kohya) != ((network, f"{module_name}.weight", None),):
            raise RuntimeError(f"kohya name {kohya} does not lead back to {network}.{module_name}")
        shape = tuple(layer.weight.shape)
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        rank = (cfg.conv_rank or cfg.rank) if conv3 else cfg.rank
        alpha = (cfg.conv_alpha or cfg.alpha) if conv3 else cfg.alpha
        limit = min(shape[0], math.prod(shape[1:]))
        if rank > limit:
            raise ConfigError(
                f"lora.{'conv_rank' if conv3 and cfg.conv_rank else 'rank'} = {rank} is larger than layer "
                f"{network}.{module_name} {list(shape)} allows ({limit}); choose a rank of at most {limit}"
            )
        net.factors[kohya] = LoraFactors(shape, rank, alpha, cfg.dropout, g).to(layer.weight.device)
        net.targets[kohya] = (layer, network)
    if not net.factors:
        raise ConfigError(f"lora.modules = {cfg.modules!r} selects no layer of this {pipe.family.name} model")
    return net


def base_model_version(pipe) -> str:
    """sd-scripts' ss_base_model_version from the model's structure."""
    width = pipe.unet.config.context_dim
    if pipe.unet.config.adm_in_channels:
        return "sdxl_base_v1-0"
    return "sd_v2" if width == 1024 else "sd_v1"


def lora_metadata(pipe, cfg: TrainConfig, steps: int, num_images: int, tags: dict[str, int]) -> dict[str, str]:
    """The ``ss_*`` metadata keys of sd-scripts (all values strings, as safetensors metadata must be)."""
    lc = cfg.lora
    args = {}
    if lc.modules == "locon":
        args.update(conv_dim=str(lc.conv_rank or lc.rank), conv_alpha=str(lc.conv_alpha or lc.alpha))
    if lc.dropout:
        args["rank_dropout"] = str(lc.dropout)
    version = base_model_version(pipe)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lc.rank),
        "ss_network_alpha": str(lc.alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": "None",
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": Path(cfg.model.base).name,
        "ss_output_name": lc.output_name,
        "ss_training_comment": "trained with latentforge (modules: " + lc.modules + ")",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.lr),
        "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.lr) if lc.text_encoder else "0",
        "ss_network_train_unet_only": str(not lc.text_encoder),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_seed": str(cfg.seed),
        "ss_num_train_images": str(num_images),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_noise_offset": str(cfg.model.noise_offset) if cfg.model.noise_offset else "None",
        "ss_keep_tokens": str(cfg.data.keep_tokens),
        "ss_shuffle_caption": str(cfg.data.shuffle_tags),
        "ss_caption_dropout_rate": str(cfg.model.caption_dropout),
        "ss_min_snr_gamma": str(cfg.model.min_snr_gamma) if cfg.model.min_snr_gamma else "None",
        "ss_training_finished_at": str(time.time()),
        "ss_tag_frequency": json.dumps({"data": tags}),
        "latentforge_config": json.dumps(config_to_dict(cfg), default=str),
    }
    return meta


def save_lora(net: LoraNetwork, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the factors in kohya's layout (float32, as trained)."""
    tensors = {}
    for name, f in net.factors.items():
        tensors[f"{name}.lora_down.weight"] = f.down.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = f.up.detach().float().cpu().contiguous()
        tensors[f"{name}.alpha"] = f.alpha.detach().float().cpu()
    return write_safetensors(tensors, Path(path), metadata=metadata, overwrite=True)
