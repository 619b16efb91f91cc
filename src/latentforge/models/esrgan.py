"""Image super-resolution networks of the ESRGAN family, and reading them from the files users keep.

- ``RRDBNet``: ESRGAN (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial
  Networks") and Real-ESRGAN (Wang et al. 2021): a 3x3 conv, residual-in-residual dense blocks (three
  5-conv dense blocks each, residuals scaled by 0.2, LeakyReLU 0.2), a trunk conv added to the first
  features, nearest x2 upsampling + conv (+ LeakyReLU) per factor of two, a conv + LeakyReLU and the
  last conv. Real-ESRGAN's x2 and x1 models pixel-unshuffle the input by 2 or 4 first (x4plus for x2).
- ``SRVGGNetCompact``: Real-ESRGAN's compact models (realesr-general-x4v3, realesr-animevideov3): conv
  + PReLU repeated, a last conv to ``out * s * s`` channels, pixel shuffle by ``s``, plus the nearest
  upsampled input.

Module names are BasicSR's (``conv_first``, ``body.N.rdb1.conv1``, ``conv_body``, ``conv_up1``,
``conv_hr``, ``conv_last``; ``body.N`` for the compact net). The original ESRGAN code's layout
(``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ``model.1.sub.<blocks>``, then the upsampling convs,
HR conv and last conv by Sequential index) is renamed on reading. Sizes come from the shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.io.components import require_finite
from latentforge.io.tensorfile import CheckpointError, open_tensor_file
from latentforge.models.limits import check_size
from latentforge.nn.tiling import tiled_apply


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the input and all earlier outputs; out = x + 0.2 * conv5(...)."""

    def __init__(self, feat: int, grow: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(feat + i * grow, grow, 3, 1, 1))
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class _RRDB(nn.Module):
    def __init__(self, feat: int, grow: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(feat, grow) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator. Scale = 2 ** ``upsamples`` / ``unshuffle``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        features: int = 64,
        blocks: int = 23,
        growth: int = 32,
        upsamples: int = 2,
        unshuffle: int = 1,
    ):
        super().__init__()
        self.unshuffle, self.upsamples = unshuffle, upsamples
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, features, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for i in range(upsamples):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(features, features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    @property
    def scale(self) -> float:
        return 2**self.upsamples / self.unshuffle

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.upsamples):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style network with PReLU activations."""

    def __init__(
        self, in_channels: int = 3, out_channels: int = 3, features: int = 64, convs: int = 16, scale: int = 4
    ):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


@dataclass(frozen=True)
class UpscalerSpec:
    """What the keys and shapes of a file say: the architecture and its sizes."""

    arch: str  # "RRDBNet" or "SRVGGNetCompact"
    scale: float
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return RRDBNet(**self.kwargs) if self.arch == "RRDBNet" else SRVGGNetCompact(**self.kwargs)


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")


# the ESRGAN repository's later names (RRDBNet_arch.py after its 2019 rewrite) -> BasicSR's
_ESRGAN_V2 = [
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
    (re.compile(r"^trunk_conv\."), "conv_body."),
    (re.compile(r"^upconv(\d)\."), r"conv_up\1."),
    (re.compile(r"^HRconv\."), "conv_hr."),
]


def basicsr_names(keys: list[str], where: str = "the file") -> dict[str, str]:
    """Map the ESRGAN repository's key names to BasicSR's (other keys map to themselves).

    Old layout: ``model.0`` first conv; ``model.1.sub.{i}.RDB{j}.conv{k}.0`` dense-block convs;
    ``model.1.sub.{blocks}`` trunk conv; then, by increasing Sequential index, one conv per x2
    upsampling, the HR conv and the last conv. Later layout: ``RRDB_trunk.{i}.RDB{j}.conv{k}``,
    ``trunk_conv``, ``upconv{n}``, ``HRconv`` (``conv_first``/``conv_last`` as BasicSR)."""
    if "model.0.weight" not in keys:
        names = {}
        for k in keys:
            new = k
            for pattern, repl in _ESRGAN_V2:
                new = pattern.sub(repl, new)
            names[k] = new
        return names
    names: dict[str, str] = {}
    top: dict[int, list[str]] = {}
    for k in keys:
        if m := _OLD_RDB.match(k):
            names[k] = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        elif m := _OLD_TRUNK.match(k):
            names[k] = f"conv_body.{m[2]}"
        elif m := _OLD_TOP.match(k):
            top.setdefault(int(m[1]), []).append(k)
        else:
            raise CheckpointError(
                f"{where}: key {k!r} is not part of the ESRGAN layout (model.0, model.1.sub.N.RDBj.convk.0, ...); "
                "this file is not an ESRGAN model latentforge can read"
            )
    order = sorted(top)
    if len(order) < 3 or order[0] != 0:
        raise CheckpointError(f"{where}: ESRGAN layout without its first, HR and last convs (model.N indices {order})")
    roles = ["conv_first", *(f"conv_up{i + 1}" for i in range(len(order) - 3)), "conv_hr", "conv_last"]
    for index, role in zip(order, roles):
        for k in top[index]:
            names[k] = f"{role}.{k.rsplit('.', 1)[1]}"
    return names


def detect(shapes: dict[str, tuple[int, ...]], where: str = "the file") -> UpscalerSpec:
    """The architecture and sizes from BasicSR-named keys and their shapes; CheckpointError if neither."""
    if "conv_first.weight" in shapes and "body.0.rdb1.conv1.weight" in shapes:
        features, in_ch = shapes["conv_first.weight"][:2]
        out_ch = shapes["conv_last.weight"][0] if "conv_last.weight" in shapes else 0
        growth = shapes["body.0.rdb1.conv1.weight"][0]
        blocks = len({k.split(".")[1] for k in shapes if k.startswith("body.")})
        ups = len([k for k in shapes if re.fullmatch(r"conv_up\d+\.weight", k)])
        unshuffle = next((r for r in (1, 2, 4) if out_ch and in_ch == out_ch * r * r), 0)
        if not out_ch or not unshuffle or "conv_hr.weight" not in shapes:
            raise CheckpointError(
                f"{where}: RRDBNet keys with unexpected shapes (first conv input {in_ch} channels, last conv "
                f"output {out_ch}); expected the input to be the output channels times 1, 4 or 16"
            )
        kwargs = dict(
            in_channels=in_ch // unshuffle**2,
            out_channels=out_ch,
            features=features,
            blocks=check_size(blocks, f"{where}: RRDB block count", "MAX_UPSCALER_BLOCKS"),
            growth=growth,
            upsamples=check_size(ups, f"{where}: upsampling conv count", "MAX_UPSAMPLES", minimum=0),
            unshuffle=unshuffle,
        )
        return UpscalerSpec("RRDBNet", 2**ups / unshuffle, kwargs)
    convs = sorted(int(m[1]) for k in shapes if (m := re.fullmatch(r"body\.(\d{1,6})\.weight", k)))
    if convs and convs[0] == 0 and len(shapes["body.0.weight"]) == 4:
        last = convs[-1]
        features, in_ch = shapes["body.0.weight"][:2]
        if "body.1.weight" not in shapes or last % 2:
            raise CheckpointError(
                f"{where}: a compact (SRVGG) network without PReLU weights at body.1; only Real-ESRGAN's PReLU "
                "compact models are supported"
            )
        scale = math.isqrt(shapes[f"body.{last}.weight"][0] // in_ch)
        if scale * scale * in_ch != shapes[f"body.{last}.weight"][0]:
            raise CheckpointError(f"{where}: compact network whose last conv does not give channels x scale^2")
        convs = check_size(last // 2 - 1, f"{where}: compact conv count", "MAX_UPSCALER_BLOCKS", minimum=0)
        kwargs = dict(in_channels=in_ch, out_channels=in_ch, features=features, convs=convs, scale=scale)
        return UpscalerSpec("SRVGGNetCompact", scale, kwargs)
    shown = ", ".join(sorted(shapes)[:5])
    raise CheckpointError(
        f"{where} is not an ESRGAN, Real-ESRGAN or Real-ESRGAN compact upscaler (keys: {shown}, ...); "
        "latentforge reads RRDBNet and SRVGGNetCompact models in the ESRGAN or BasicSR layout"
    )


@dataclass
class ImageUpscaler:
    """A loaded upscaling network. ``scale`` is its native factor; images are RGB in [0, 1]."""

    name: str
    net: nn.Module
    spec: UpscalerSpec
    path: Path | None = None
    tile: int = 192  # input pixels per tile (0: never tile)
    overlap: int = 16
    pad: int = 10  # mirrored pixels around the image
    max_pixels: int = 8192 * 8192  # output pixels above which upscaling is refused (float32 output: 800 MB)

    @property
    def scale(self) -> float:
        return self.spec.scale

    def __call__(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, h * scale, w * scale). The input is first padded by ``pad``
        mirrored pixels (as realesrgan-ncnn-vulkan does; zero padding at the borders gives visible edges),
        and run over overlapping tiles with blended seams when larger than a tile (memory of one tile
        plus the output)."""
        h, w = x.shape[-2:]
        s = self.spec.scale
        if round(h * s) * round(w * s) > self.max_pixels:
            raise ValueError(
                f"{self.name}: a {w}x{h} image enlarged {s:g}x would be {round(w * s)}x{round(h * s)}, above the "
                f"limit of {self.max_pixels} output pixels; downscale it first or raise ImageUpscaler.max_pixels"
            )
        param = next(self.net.parameters())
        x = x.to(param.device, param.dtype)
        r = self.spec.kwargs.get("unshuffle", 1)  # pixel-unshuffle needs sizes divisible by its factor
        p = self.pad
        mode = "reflect" if min(h, w) > p + r else "replicate"
        x = F.pad(x, (p, p + (-(w + 2 * p) % r), p, p + (-(h + 2 * p) % r)), mode=mode)
        with torch.inference_mode():
            tile = self.tile // r * r
            if tile and max(x.shape[-2:]) > tile:
                up, down = (int(s), 1) if s >= 1 else (1, round(1 / s))
                out = tiled_apply(self.net, x, tile, self.overlap // r * r, up=up, down=down)
            else:
                out = self.net(x).float()
        top = round(p * s)
        return out[..., top : top + round(h * s), top : top + round(w * s)]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an upscaler file (``.pth`` with ``weights_only=True``, or ``.safetensors``) in
    BasicSR names; BasicSR's ``params_ema``/``params`` wrappers are unwrapped by the file reader. A tensor
    holding NaN or Inf (a damaged file: every upscaled image would be black) is refused by name."""
    f = open_tensor_file(path)
    try:
        names = basicsr_names(f.keys(), str(path))
        return {names[k]: require_finite(f.read(k, torch.float32), f"{path}: tensor {k!r}") for k in f.keys()}
    finally:
        f.close()


def load_upscaler(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ImageUpscaler:
    """Read an ESRGAN-family file, detect its architecture and sizes, and build the network."""
    path = Path(path)
    sd = read_state_dict(path)
    try:
        spec = detect({k: tuple(v.shape) for k, v in sd.items()}, str(path))
    except (ValueError, IndexError, KeyError, ZeroDivisionError) as e:  # shapes of the wrong rank or size
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: tensor shapes that form no upscaler ({type(e).__name__}: {e})") from None
    with torch.device("meta"):  # sizes come from shapes: never allocate more than the file holds
        need = sum(p.numel() for p in spec.build().parameters())
    if need > sum(v.numel() for v in sd.values()):
        raise CheckpointError(
            f"{path}: the shapes describe a {spec.arch} of {need} parameters but the file holds fewer numbers; "
            "it is damaged or not an upscaler latentforge can read"
        )
    net = spec.build()
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that do not fit the detected sizes
        raise CheckpointError(f"{path}: detected {spec.arch} x{spec.scale:g} but {str(e)[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: detected {spec.arch} x{spec.scale:g} but the keys do not fit: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; the file may be damaged or a variant latentforge does not know"
        )
    net.eval().requires_grad_(False).to(device, dtype)
    return ImageUpscaler(path.stem, net, spec, path)
