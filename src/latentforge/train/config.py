"""Training configuration: typed dataclasses read from TOML, with ``section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


MODES = ("diffusion", "vae", "lora", "embedding", "controlnet")
LORA_MODULES = ("attention", "attention_ff", "locon")


@dataclass
class ModelConfig:
    base: str = ""  # checkpoint to fine-tune; empty: a new model of `family`
    family: str = "demo"  # family of a new model
    vae: str = ""  # VAE file for a new model (trained with mode = "vae")
    train_text_encoder: bool = False
    objective: str = ""  # "eps" or "v"; empty: the model's own parameterisation
    min_snr_gamma: float = 0.0  # min-SNR loss weighting (Hang et al. 2023); 0 = off
    caption_dropout: float = 0.1  # probability of an empty caption, so CFG works
    noise_offset: float = 0.0  # kohya's noise offset: + offset * N(0, 1) per sample and channel; 0 = off
    init_seed: int = 0  # weights of a new model


@dataclass
class DataConfig:
    kind: str = "folder"  # "folder" (images with same-named .txt captions) or "synthetic"
    path: str = ""
    resolution: int = 64
    size: int = 20000  # synthetic: number of scenes
    synthetic_seed: int = 0
    holdout: list = field(default_factory=list)  # synthetic: "colour shape" / "colour on background" never drawn
    # synthetic: draw only these shapes / shape colours / backgrounds (may name the scenes' new "star" and
    # "teal", which the demo model never saw); all empty: the demo model's own scene sequence
    shapes: list = field(default_factory=list)
    colours: list = field(default_factory=list)
    backgrounds: list = field(default_factory=list)
    on_bad: str = "skip"  # unreadable image or missing caption: "skip" (reported) or "error"
    cache_latents: bool = True
    shuffle_tags: bool = False  # shuffle a caption's comma-separated tags each step (kohya shuffle_caption)
    keep_tokens: int = 0  # with shuffle_tags: this many leading tags stay in place (kohya keep_tokens)
    default_caption: str = ""  # caption of images without a .txt file; empty: such images are problems
    buckets: bool = False  # aspect-ratio bucketing (folder data): each image at the nearest bucket's size
    bucket_step: int = 64  # bucket sides are multiples of this (pixels)

    def check_synthetic_choices(self) -> None:
        """``shapes``/``colours``/``backgrounds`` name known scene words, only for synthetic data."""
        from latentforge.train.shapes import ALL_COLOURS, ALL_SHAPES, COLOURS, SHAPES, _check_choices

        choices = {"shapes": self.shapes, "colours": self.colours, "backgrounds": self.backgrounds}
        if not any(choices.values()):
            return
        if self.kind != "synthetic":
            raise ConfigError("data.shapes, data.colours and data.backgrounds need data.kind = 'synthetic'")
        for key, values in choices.items():
            known = ALL_SHAPES if key == "shapes" else tuple(ALL_COLOURS)
            bad = [v for v in values if v not in known]
            if bad:
                raise ConfigError(f"data.{key} has unknown names {bad!r}; known: {', '.join(known)}")
        try:
            holdout = frozenset(str(h).lower() for h in self.holdout)
            _check_choices(self.shapes or SHAPES, self.colours or COLOURS, self.backgrounds or COLOURS, holdout)
        except ValueError as e:
            raise ConfigError(f"data.shapes/colours/backgrounds/holdout: {e}") from None


@dataclass
class LoraConfig:
    """mode = "lora": LoRA factors trained on the frozen model (Hu et al. 2021), saved as a kohya file."""

    rank: int = 4
    alpha: float = 1.0  # the delta is scaled by alpha / rank (kohya's network_alpha)
    modules: str = "attention_ff"  # "attention", "attention_ff" (all of the transformer blocks), "locon" (+ convs)
    conv_rank: int = 0  # locon: rank of the 3x3 convolutions; 0 = rank
    conv_alpha: float = 0.0  # locon: their alpha; 0 = alpha
    text_encoder: bool = False  # also train LoRA factors on the text encoders' attention and MLP layers
    dropout: float = 0.0  # rank dropout (kohya rank_dropout): each rank is dropped with this probability
    output_name: str = "lora"  # the file is output/<output_name>.safetensors


@dataclass
class EmbeddingConfig:
    """mode = "embedding": textual inversion (Gal et al. 2022), saved in A1111's formats."""

    token: str = ""  # the name prompts use (also the file stem)
    init_text: str = "*"  # the vectors start as this text's token embeddings (repeated to num_vectors)
    num_vectors: int = 1


@dataclass
class ControlNetTrainConfig:
    """mode = "controlnet": a ControlNet (Zhang et al. 2023) trained on the frozen model (train/controlnet.py)."""

    conditioning_path: str = ""  # folder data: control images named as the images (kohya's conditioning_data_dir)
    hint_widths: list = field(default_factory=list)  # hint encoder widths; empty: (16, 32, 96, 256) cut to the VAE
    output_name: str = "controlnet"  # the file is output/<output_name>.safetensors
    holdout_centres: list = field(default_factory=list)  # synthetic: [x, y] blob centres (fractions) never drawn
    holdout_radius: float = 0.06  # synthetic: no training centre lies this close to a held-out one


@dataclass
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2022) with prior preservation, as diffusers' train_dreambooth does it: each
    batch holds the instance images and as many class images generated by the base model itself; the loss
    is instance loss + prior_loss_weight x class loss. Works with mode = "diffusion" and mode = "lora"."""

    enabled: bool = False
    instance_prompt: str = ""  # the rare-token prompt ("a photo of sks dog"): caption of images without .txt
    class_prompt: str = ""  # the class ("a photo of a dog"); empty or prior_loss_weight = 0: no prior loss
    class_data_dir: str = ""  # class images: generated ones are cached here; images already here are used
    num_class_images: int = 100  # generate until the folder holds this many images
    prior_loss_weight: float = 1.0
    class_negative_prompt: str = ""
    class_sampler: str = "DPM++ 2M"
    class_steps: int = 20
    class_cfg_scale: float = 7.0
    class_seed: int = 0  # class image i (named class-<i>.png) is generated with seed class_seed + i


@dataclass
class VAETrainConfig:
    kl_weight: float = 1e-6
    l2_weight: float = 1.0  # plus L1 with weight 1
    disc_weight: float = 0.0  # patch discriminator (hinge GAN); 0 = off
    disc_start: int = 1000
    normalize_latents: bool = True  # rescale so that latents x family scale have unit variance


@dataclass
class TrainConfig:
    mode: str = "diffusion"  # "diffusion" (UNet, optionally text encoder), "vae", "lora", "embedding", "controlnet"
    output: str = "runs/train"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    lr_warmup: int = 100
    lr_schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    weight_decay: float = 0.01
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    ema_decay: float = 0.999  # 0 = no EMA
    mixed_precision: str = "auto"  # "auto" (bf16 where the CPU/GPU supports it), "bf16", "no"
    gradient_checkpointing: bool = False
    save_every: int = 1000
    sample_every: int = 1000
    sample_prompts: list = field(default_factory=lambda: ["a red circle on a blue background"])
    sample_steps: int = 20
    log_every: int = 25
    device: str = "cpu"
    resume: bool = True  # continue from output/state if it exists
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)

    def validate(self) -> None:
        """Refuse values that cannot train: each message names the key, its value and what is allowed."""
        for key, low, high in _NUMBERS:
            v = _get(self, key)
            if not _in_range(v, low, high):
                raise ConfigError(f"config key '{key}' must be {_range_text(low, high)}, got {v!r}")
        betas = self.adam_betas
        if not (
            isinstance(betas, list) and len(betas) == 2 and all(_in_range(b, (0.0, True), (1.0, False)) for b in betas)
        ):
            raise ConfigError(f"config key 'adam_betas' must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(self.sample_prompts, list) or not all(isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError(f"config key 'sample_prompts' must be a list of strings, got {self.sample_prompts!r}")
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1, "steps, batch_size, grad_accum >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
            (self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision must be 'auto', 'bf16' or 'no'"),
            (self.data.kind in ("folder", "synthetic"), "data.kind must be 'folder' or 'synthetic'"),
            (self.data.on_bad in ("skip", "error"), "data.on_bad must be 'skip' or 'error'"),
            (self.data.resolution % 8 == 0, "data.resolution must be a multiple of 8"),
            (self.model.objective in ("", "eps", "v"), "model.objective must be '', 'eps' or 'v'"),
            (self.data.kind != "folder" or bool(self.data.path), "data.path is required for data.kind = 'folder'"),
            (self.data.keep_tokens >= 0, "data.keep_tokens must be 0 or more"),
            (
                not self.data.buckets or (self.data.kind == "folder" and self.mode != "vae"),
                "data.buckets needs data.kind = 'folder' and mode 'diffusion', 'lora' or 'embedding'",
            ),
            (
                self.data.bucket_step >= 8 and self.data.bucket_step % 8 == 0,
                "data.bucket_step must be a multiple of 8",
            ),
            (self.model.noise_offset >= 0, "model.noise_offset must be 0 or more"),
            (self.lora.rank >= 1 and self.lora.conv_rank >= 0, "lora.rank must be >= 1 and lora.conv_rank >= 0"),
            (self.lora.alpha > 0 and self.lora.conv_alpha >= 0, "lora.alpha must be positive"),
            (
                self.lora.modules in LORA_MODULES,
                f"lora.modules must be one of {', '.join(LORA_MODULES)}, got {self.lora.modules!r}",
            ),
            (0 <= self.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
            (self.embedding.num_vectors >= 1, "embedding.num_vectors must be 1 or more"),
            (
                self.mode != "embedding" or bool(self.embedding.token.strip()),
                "mode = 'embedding' needs embedding.token (the word prompts will use)",
            ),
            (
                self.mode not in ("lora", "embedding", "controlnet") or bool(self.model.base),
                f"mode = '{self.mode}' needs model.base",
            ),
            (self.mode != "controlnet" or not self.data.buckets, "mode = 'controlnet' trains without data.buckets"),
        ]
        checks += _dreambooth_checks(self)
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.data.check_synthetic_choices()


def _dreambooth_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    d = cfg.dreambooth
    if not d.enabled:
        return []
    prior = d.prior_loss_weight > 0 and bool(d.class_prompt.strip())
    return [
        (
            cfg.mode in ("diffusion", "lora") and bool(cfg.model.base),
            f"dreambooth.enabled needs mode = 'diffusion' or 'lora' and model.base (got mode = '{cfg.mode}'"
            f"{', no model.base' if not cfg.model.base else ''}): class images come from the base model",
        ),
        (cfg.data.kind == "folder", "dreambooth.enabled needs data.kind = 'folder' (the instance images)"),
        (
            bool(d.instance_prompt.strip()),
            "dreambooth.enabled needs dreambooth.instance_prompt (the rare-token prompt, e.g. 'a photo of sks dog')",
        ),
        (
            not prior or bool(d.class_data_dir),
            "dreambooth.class_prompt needs dreambooth.class_data_dir (the folder where class images are cached)",
        ),
        (
            not prior or not cfg.data.buckets,
            "dreambooth prior preservation needs data.buckets = false (class images are square at data.resolution)",
        ),
        (d.num_class_images >= 1 or not prior, "dreambooth.num_class_images must be 1 or more"),
    ]


# numeric keys: (key, (low, low included), (high, high included)); _INF = unbounded. NaN and Inf are
# never accepted (an infinite learning rate trains to NaN weights at the first step).
_INF = None
_NUMBERS = [
    ("steps", (1, True), (10**9, True)),
    ("batch_size", (1, True), (4096, True)),
    ("grad_accum", (1, True), (4096, True)),
    ("lr", (0.0, False), _INF),
    ("lr_warmup", (0, True), _INF),
    ("weight_decay", (0.0, True), _INF),
    ("grad_clip", (0.0, True), _INF),
    ("ema_decay", (0.0, True), (1.0, False)),
    ("save_every", (0, True), _INF),
    ("sample_every", (0, True), _INF),
    ("sample_steps", (1, True), (1000, True)),
    ("log_every", (0, True), _INF),
    ("model.min_snr_gamma", (0.0, True), _INF),
    ("model.caption_dropout", (0.0, True), (1.0, True)),
    ("data.resolution", (16, True), (8192, True)),
    ("data.size", (1, True), (10**8, True)),
    ("controlnet.holdout_radius", (0.0, True), (1.0, True)),
    ("vae.kl_weight", (0.0, True), _INF),
    ("vae.l2_weight", (0.0, True), _INF),
    ("vae.disc_weight", (0.0, True), _INF),
    ("vae.disc_start", (0, True), _INF),
    ("dreambooth.prior_loss_weight", (0.0, True), _INF),
    ("dreambooth.num_class_images", (0, True), (100000, True)),
    ("dreambooth.class_steps", (1, True), (1000, True)),
    ("dreambooth.class_cfg_scale", (0.0, True), (100.0, True)),
]


def _get(cfg: TrainConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _in_range(v, low, high) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if low is not None and (v < low[0] or (v == low[0] and not low[1])):
        return False
    return high is None or v < high[0] or (v == high[0] and high[1])


def _range_text(low, high) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low[1] else '>'} {low[0]}")
    if high is not None:
        parts.append(f"{'<=' if high[1] else '<'} {high[0]}")
    return "a finite number " + " and ".join(parts)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return _build(typ, value, key + ".")
    origin = getattr(typ, "__origin__", None)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif (typ is list or origin is list) and isinstance(value, list):
        return value
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """``a.b=value`` into a nested dict (value parsed as JSON when it can be: 10, 1e-4, true, [1, 2])."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a table")
    node[parts[-1]] = _parse_value(value.strip())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config (optional) and apply overrides; unknown keys fail with their name."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides or []:
        apply_override(data, item)
    cfg = _build(TrainConfig, data)
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
