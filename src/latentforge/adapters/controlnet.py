"""ControlNet files (Zhang et al. 2023) and the model-denoiser wrapper that feeds their residuals to the UNet.

Files: the original layout (``control_model.`` prefix in full files, bare keys in standalone ones) or the
diffusers ``ControlNetModel`` layout, read only through ``io.tensorfile.open_tensor_file``. The config is
inferred from shapes; what shapes cannot tell (heads, norm groups) comes from the UNet it will control,
and a ControlNet whose context width or vector input differs from that UNet's is refused by name.

Per unit (the A1111 ControlNet extension's rules): ``weight`` scales every residual; the unit runs only on
steps whose fraction ``step / steps`` of the pass lies in ``[guidance_start, guidance_end]``; control
mode 1 ("My prompt is more important") and 2 ("ControlNet is more important") use the soft weights
``weight * 0.825 ** (12 - i)`` over the residual list (input blocks, then the middle), as does a unit made
``soft`` by its caller (the extension forces them in the hires pass for canny edges); mode 2 also applies
the control to the conditional rows only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from latentforge.convert.diffusers import _RESNET
from latentforge.families.infer import ArchitectureError, unet_layout
from latentforge.io.components import require_finite
from latentforge.io.tensorfile import CheckpointError, open_tensor_file
from latentforge.models.controlnet import ControlNet, ControlNetConfig, diffusers_key
from latentforge.models.limits import MAX_IO_CHANNELS, MAX_MULT, MAX_TRANSFORMER_DEPTH, MAX_WIDTH
from latentforge.models.unet import ControlResiduals, UNetConfig
from latentforge.sampling.denoisers import Cond, ModelDenoiser

PREFIX = "control_model."
SOFT_BASE = 0.825  # the extension's soft-injection ratio per block


class ControlNetError(CheckpointError):
    """A ControlNet file that cannot be used (layout, shapes, or another family's model)."""


def _inverse_resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def original_key(key: str, num_res_blocks: int, hint_convs: int) -> str:
    """diffusers ``ControlNetModel`` key -> original key (the inverse of ``models.controlnet.diffusers_key``,
    which checks each result)."""
    n = num_res_blocks
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "controlnet_mid_block": "middle_block_out.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (hint_convs - 1)}",
    }
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)$", key):
        return f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$", key):
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", key):
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        base = 1 + level * (n + 1)
        if kind == "downsamplers":
            return f"input_blocks.{base + n}.0.op.{rest.removeprefix('conv.')}"
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_inverse_resnet(rest)}"
        return f"input_blocks.{base + j}.1.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_inverse_resnet(rest)}"
    raise KeyError(key)


def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def infer_config(shapes: dict[str, tuple[int, ...]], target: UNetConfig, source: str) -> ControlNetConfig:
    """The ControlNet's config from its shapes (original names); heads and norm groups from ``target``."""
    try:
        levels, n = unet_layout(shapes)
    except ArchitectureError as e:
        raise ControlNetError(f"{source}: {e}") from e

    def need(key: str, rank: int) -> tuple[int, ...]:
        if key not in shapes or len(shapes[key]) != rank:
            raise ControlNetError(f"{source}: tensor {key!r} is missing or not of rank {rank}; not a ControlNet file")
        return shapes[key]

    conv_in = need("input_blocks.0.0.weight", 4)
    mc = conv_in[0]
    mult, depth = [], []
    for level in range(levels):
        first = 1 + level * (n + 1)
        width = need(f"input_blocks.{first}.0.out_layers.3.weight", 4)[0]
        if mc < 1 or width % mc:
            raise ControlNetError(f"{source}: level {level} width {width} is not a multiple of {mc} channels")
        mult.append(width // mc)
        blocks = _indices(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        depth.append(len(blocks))
    middle = len(_indices(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if max([*depth, middle]) > MAX_TRANSFORMER_DEPTH:
        raise ControlNetError(f"{source}: transformer depth above latentforge's limit of {MAX_TRANSFORMER_DEPTH}")
    ctx = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2]
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    adm = need("label_emb.0.0.weight", 2)[1] if "label_emb.0.0.weight" in shapes else None
    context = ctx[0][1] if ctx else target.context_dim
    if context != target.context_dim or adm != target.adm_in_channels:
        raise ControlNetError(
            f"{source}: this ControlNet is for another model family (context width {context}, vector input "
            f"{adm}; the loaded model has {target.context_dim} and {target.adm_in_channels}); use a ControlNet "
            "made for the loaded model's family"
        )
    unet = dataclasses.replace(
        target,
        in_channels=conv_in[1],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=n,
        transformer_depth=tuple(depth),
        transformer_depth_out=None,
        transformer_depth_middle=middle,
        context_dim=context,
        use_linear_proj=bool(proj) and len(proj[0]) == 2,
        adm_in_channels=adm,
        num_classes=None,
        cross_only=(),
    )
    convs = sorted(_indices(shapes, r"input_hint_block\.(\d+)\.weight$"))
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)) or len(convs) % 2:
        raise ControlNetError(f"{source}: the hint encoder 'input_hint_block' has convolutions at {convs[:20]}")
    outs = [need(f"input_hint_block.{i}.weight", 4) for i in convs]
    hint_in = outs[0][1]
    widths = [mc, *(mc * m for m in mult), *(s[0] for s in outs)]
    if max(widths) > MAX_WIDTH or max(mult) > MAX_MULT or not 1 <= hint_in <= MAX_IO_CHANNELS or min(widths) < 1:
        raise ControlNetError(
            f"{source}: widths {sorted(set(widths))[:8]}, level multipliers {mult} or hint channels {hint_in} are "
            f"outside latentforge's limits (widths 1 to {MAX_WIDTH}, multipliers up to {MAX_MULT}, channels up to "
            f"{MAX_IO_CHANNELS}); the file is damaged or not a ControlNet"
        )
    return ControlNetConfig(unet, hint_channels=hint_in, hint_widths=tuple(s[0] for s in outs[:-1:2]))


def load_controlnet(
    path: str | Path, target: UNetConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ControlNet:
    """A ControlNet file in either layout, checked against the UNet config it will control."""
    source = str(path)
    file = open_tensor_file(path)
    try:
        keys = file.keys()
        if any(k.startswith(PREFIX) for k in keys):
            names = {k[len(PREFIX) :]: k for k in keys if k.startswith(PREFIX)}
        elif "controlnet_cond_embedding.conv_in.weight" in keys:
            downs = _indices(keys, r"down_blocks\.\d+\.resnets\.(\d+)\.")
            hint = len(_indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")) + 2
            names = {}
            for k in keys:
                try:
                    names[original_key(k, max(downs, default=0) + 1, hint)] = k
                except KeyError:
                    raise ControlNetError(f"{source}: unexpected tensor {k!r} in a diffusers ControlNet") from None
        elif "input_hint_block.0.weight" in keys:
            names = {k: k for k in keys}
        else:
            raise ControlNetError(
                f"{source} is not a ControlNet: it has neither 'control_model.*' / 'input_hint_block.*' keys "
                "(original layout) nor 'controlnet_cond_embedding.*' (diffusers layout)"
            )
        shapes = {ours: tuple(file.shape(k)) for ours, k in names.items()}
        cfg = infer_config(shapes, target, source)
        with torch.device("meta"):
            net = ControlNet(cfg)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
        if missing or extra or wrong:
            raise ControlNetError(
                f"{source}: the tensors do not form a ControlNet: missing {missing[:5]}, unexpected {extra[:5]}, "
                f"wrong shapes {[(k, shapes[k], expected[k]) for k in wrong[:5]]}"
            )
        state = {}
        for k in expected:  # a damaged file would turn every controlled image into NaN
            t = require_finite(file.read(names[k], dtype), f"{source}: tensor {names[k]!r}", ControlNetError)
            state[k] = t.to(device)
    finally:
        file.close()
    net.load_state_dict(state, assign=True)
    return net.eval()


def round_trip_ok(net: ControlNet) -> bool:
    """Every key maps to diffusers and back to itself (the two tables agree)."""
    cfg = net.config
    hint = len(cfg.hint_widths) * 2
    n = cfg.unet.num_res_blocks
    return all(original_key(diffusers_key(k, n, hint), n, hint) == k for k in net.state_dict())


@dataclass
class ActiveUnit:
    """A loaded unit for one pass: its network, its hint at the pass's pixel size (1, 3, H, W) in [0, 1]."""

    net: ControlNet
    hint: Tensor
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0
    soft: bool = False  # soft weights also in the balanced mode
    region: Tensor | None = None  # (1, 1, h, w) in [0, 1]: each residual is scaled by it, resized (bilinear)

    def scales(self, count: int) -> list[float]:
        if self.soft or self.control_mode != 0:
            return [self.weight * SOFT_BASE ** float(12 - i) for i in range(count)]
        return [self.weight] * count


@dataclass
class Restore:
    """The ControlNet extension's "inpaint_only" hold on the unmasked area (its restore step in hook.py):
    after each UNet call the prediction becomes ``x0``, with ``a`` the model's alphas_cumprod at the call's
    timestep rounded (eps: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``, the extension's formula), ``x0``
    keeps the unit image's latent outside the mask, and the prediction is made back from it, blended with
    the UNet's by ``weight`` clipped to [0, 1]. Every call of the pass, whatever the unit's guidance range.
    A v-prediction output goes through the same steps with v's relations (``x0 = sqrt(a) x_t - sqrt(1 - a)
    v``; the extension applies the eps formula to any output)."""

    latent: Tensor  # (1, C, h, w) the VAE latent of the unit's image at the pass's size
    mask: Tensor  # (1, 1, h, w) 1 = repaint: the pixel mask max-pooled (10 x 10, stride 8, padding 1)
    weight: float

    def __call__(self, out: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str) -> Tensor:
        index = t.round().long().clamp(0, alphas_cumprod.numel() - 1).to(alphas_cumprod.device)
        a = alphas_cumprod[index].to(device=out.device, dtype=torch.float32).view(-1, 1, 1, 1)
        x_t, pred = x_t.float(), out.float()
        mask, latent = self.mask.to(x_t), self.latent.to(x_t)
        if prediction == "eps":  # in 1 / sqrt(a) terms, as the extension computes
            r, r1 = (1 / a).sqrt(), (1 / a - 1).sqrt()
            x0 = (r * x_t - r1 * pred) * mask + latent * (1 - mask)
            held = (r * x_t - x0) / r1
        else:
            sa, s1 = a.sqrt(), (1 - a).sqrt()
            x0 = (sa * x_t - s1 * pred) * mask + latent * (1 - mask)
            held = (sa * x_t - x0) / s1
        w = min(max(float(self.weight), 0.0), 1.0)
        return (held * w + pred * (1 - w)).to(out.dtype)


class ControlledDenoiser:
    """A ``ModelDenoiser`` whose UNet gets the units' summed residuals on each call. ``sigmas``: the pass's
    schedule (the step of a call is found from its sigma); ``uncond``: contexts of the unconditional side
    (rows equal to one of them get no control from units in mode 2)."""

    def __init__(
        self,
        inner: ModelDenoiser,
        units: Sequence[ActiveUnit],
        sigmas: Tensor,
        uncond: Sequence[Tensor] = (),
        restores: Sequence[Restore] = (),
    ):
        self.inner, self.units = inner, list(units)
        self.restores = list(restores)
        self.sigmas = sigmas.double().cpu()
        self.uncond = list(uncond)

    def __getattr__(self, name: str):  # schedule, prediction, scalings, target, ...
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def step_fraction(self, sigma: float) -> float:
        """step / steps of the pass for a call at ``sigma`` (a second-order midpoint belongs to its step)."""
        steps = len(self.sigmas) - 1
        step = int((self.sigmas[:-1] >= sigma * (1 - 1e-6)).sum()) - 1
        return max(step, 0) / max(steps, 1)

    def _cond_rows(self, context: Tensor) -> Tensor:
        rows = torch.ones(context.shape[0], dtype=torch.bool, device=context.device)  # on the device: no wait
        for u in self.uncond:
            if u.shape[1:] == context.shape[1:]:
                same = (context == u[:1].to(context)).flatten(1).all(1)
                rows &= ~same
        return rows

    def residuals(self, x: Tensor, t: Tensor, cond: Cond, sigma: float) -> ControlResiduals | None:
        frac = self.step_fraction(sigma)
        total: ControlResiduals | None = None
        for unit in self.units:
            if frac < unit.guidance_start or frac > unit.guidance_end or unit.weight == 0:
                continue
            net = unit.net
            inp = x[:, : net.config.unet.in_channels]
            hint = unit.hint.to(device=x.device).expand(x.shape[0], -1, -1, -1)
            res = net(inp, t, cond.context, hint, cond.vector)
            outs = [*res.output, res.middle]
            scales = unit.scales(len(outs))
            mark = None
            if unit.control_mode == 2:
                mark = self._cond_rows(cond.context).to(device=x.device, dtype=outs[0].dtype)[:, None, None, None]
            outs = [o * s for o, s in zip(outs, scales)]
            if unit.region is not None:  # the extension's effective region mask, at each residual's size
                region = unit.region.to(device=x.device, dtype=torch.float32)
                outs = [o * F.interpolate(region, size=o.shape[-2:], mode="bilinear").to(o.dtype) for o in outs]
            if mark is not None:
                outs = [o * mark for o in outs]
            if total is None:
                total = ControlResiduals(output=outs[:-1], middle=outs[-1])
            else:
                total.output = [a + b for a, b in zip(total.output, outs[:-1])]
                total.middle = total.middle + outs[-1]
        return total

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Cond) -> Tensor:
        inner = self.inner
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        inp, t, s = inner.network_input(x, sigma, cond)
        control = self.residuals(inp, t, cond, float(sigma[0]))
        out = inner.unet(inp, t, cond.context, cond.vector, control=control).to(x.dtype)
        for restore in self.restores:  # inpaint_only units: on the UNet's own output, every row
            out = restore(out, inp[:, : x.shape[1]], t, inner.schedule.alphas_cumprod, inner.prediction)
        c_skip, c_out, _ = inner.scalings(s)
        return c_skip * x + c_out * out
