"""Adapter-file module names -> latentforge parameter names, one table per naming scheme.

LoRA-style files name the *module* a delta belongs to, in one of several schemes:

- kohya (sd-scripts, LyCORIS): ``lora_unet_<path with . -> _>``; SD1/SD2 files use the diffusers UNet paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), SDXL files the original SGM
  paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); text encoders ``lora_te_`` (one
  encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the Hugging Face path (``text_model_encoder_layers_0_
  self_attn_q_proj``). kohya's OFT files say ``oft_unet_`` instead of ``lora_unet_``. The part after the
  module name is one of ``_SUFFIXES``, or IA3's bare ``.weight`` after a dotless ``lora_`` name.
- diffusers / PEFT: ``unet.<diffusers path>``, ``text_encoder.<HF path>``, ``text_encoder_2.<HF path>``;
  older files spell attention processors (``attn1.processor.to_q_lora``), which ``split_key`` rewrites.
- OpenCLIP paths for the bigG / ViT-H encoders (``transformer_resblocks_0_attn_in_proj``): the fused
  q/k/v projection lands on thirds of our separate ``q_proj``/``k_proj``/``v_proj`` (``convert/openclip.py``).

Besides Linear/Conv2d layers the index names the GroupNorm/LayerNorm layers (``..._resnets_0_norm1``,
``..._transformer_blocks_0_norm1``, ``lora_te_text_model_encoder_layers_0_layer_norm1``, OpenCLIP
``ln_1``), which LyCORIS norm modules (``w_norm``/``b_norm``) change.

Our UNet keeps the original module names and our text encoders Hugging Face names, so each scheme is a
function of our own module list plus the shared UNet table of ``convert/diffusers.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from latentforge.convert import openclip
from latentforge.convert.diffusers import unet_key

# (network, parameter name, third of a fused q/k/v delta or None)
Target = tuple[tuple[str, str, int | None], ...]

# tensor-name suffixes of the adapter formats -> the part they hold
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"),  # PEFT's DoRA: a per-output-row magnitude
    (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".w_norm", "w_norm"),
    (".b_norm", "b_norm"),
    (".on_input", "on_input"),  # IA3: whether its "weight" scales the input channels
    (".oft_blocks", "oft_blocks"),  # OFT (kohya, LyCORIS) and, 4-d, LyCORIS BOFT
    (".oft_diag", "oft_diag"),  # old LyCORIS OFT: the rotation blocks themselves
    (".rescale", "rescale"),  # LyCORIS (B)OFT's per-output-channel rescale
    (".a1.weight", "a1.weight"),  # GLoRA: A1111 keeps these part names
    (".a2.weight", "a2.weight"),
    (".b1.weight", "b1.weight"),
    (".b2.weight", "b2.weight"),
)
# the attention-processor spelling of old diffusers files: attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def split_key(key: str) -> tuple[str, str] | None:
    """A tensor name of an adapter file -> (module name as the file spells it, part), or None if unknown."""
    if m := _PROCESSOR.search(key):
        module = key[: m.start()] + "." + (m.group(1) + ".0" if m.group(1) == "to_out" else m.group(1))
        return module, m.group(2)
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    # IA3's scale is the bare part "weight" (A1111 splits a name at its first dot); only a kohya-style module
    # name (no dot, "lora_" prefix) is taken, so no checkpoint or upscaler tensor reads as an IA3 module
    module, _, part = key.partition(".")
    if part == "weight" and module.startswith("lora_"):
        return module, "weight"
    return None


def _flat(name: str) -> str:
    return name.replace(".", "_")


# the layers adapter files change: LoRA-style factors target Linear/Conv2d, LyCORIS norm modules (w_norm,
# b_norm) GroupNorm/LayerNorm (A1111 patches all four)
_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


def _weighted_modules(module: nn.Module) -> list[str]:
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]


def unet_index(unet: nn.Module, num_res_blocks: int) -> dict[str, Target]:
    """Every name a UNet module goes by in adapter files -> its parameter."""
    index: dict[str, Target] = {}
    for name in _weighted_modules(unet):
        target: Target = (("unet", f"{name}.weight", None),)
        try:
            diffusers = unet_key(f"{name}.weight", num_res_blocks).removesuffix(".weight")
        except KeyError:
            diffusers = None
        # kohya's OFT files say oft_unet_ (A1111 matches their original names)
        names = [f"lora_unet_{_flat(name)}", f"oft_unet_{_flat(name)}", f"unet.{name}"]
        if diffusers is not None:
            names += [f"lora_unet_{_flat(diffusers)}", f"oft_unet_{_flat(diffusers)}", f"unet.{diffusers}", diffusers]
        for n in names:
            index[n] = target
    return index


def text_index(encoder: nn.Module, network: str, kohya_prefix: str) -> dict[str, Target]:
    """Every name a text-encoder module goes by (Hugging Face and OpenCLIP paths) -> its parameters."""
    index: dict[str, Target] = {}
    for name in _weighted_modules(encoder):
        target: Target = ((network, f"{name}.weight", None),)
        hf = f"text_model.{name}"
        for n in (f"{kohya_prefix}{_flat(hf)}", f"{network}.{hf}", f"{network}.{name}"):
            index[n] = target
    layers = sorted({int(m.group(1)) for n in index if (m := re.search(r"encoder\.layers\.(\d+)\.", n))})
    for i in layers:
        for module in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"):
            suffix = "_weight" if module == "attn.in_proj" else ".weight"
            parts = openclip.to_hf(f"transformer.resblocks.{i}.{module}{suffix}")
            target = tuple((network, key, third) for key, third in parts)
            open_name = f"transformer.resblocks.{i}.{module}"
            for n in (f"{kohya_prefix}{_flat(open_name)}", f"{network}.{open_name}"):
                index[n] = target
    return index


def model_index(networks: Mapping[str, nn.Module], num_res_blocks: int) -> dict[str, Target]:
    """All module names of a loaded model's UNet and text encoders, in every scheme this module knows."""
    index = unet_index(networks["unet"], num_res_blocks)
    encoders = [n for n in networks if n.startswith("text_encoder")]
    for i, network in enumerate(encoders):
        prefixes = ["lora_te_"] if len(encoders) == 1 else []
        prefixes.append(f"lora_te{i + 1}_")
        for prefix in prefixes:
            index.update(text_index(networks[network], network, prefix))
    return index
