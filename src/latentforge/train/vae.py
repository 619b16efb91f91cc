"""Training a small AutoencoderKL from nothing: reconstruction (L1 + L2) + KL, optional patch GAN.

After training, the latent space is rescaled exactly (quant_conv's mean rows times a, post_quant_conv's
input columns divided by a) so that latents times the family's scale factor have unit variance, the
convention the diffusion model is trained in (Rombach et al. 2022 set 0.18215 this way for SD).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.families import get_family
from latentforge.io.writer import write_safetensors
from latentforge.models.vae import AutoencoderKL
from latentforge.train import common, distributed
from latentforge.train.config import TrainConfig
from latentforge.train.data import load_dataset, sample_order, to_model_range

log = logging.getLogger("latentforge")


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): real/fake logits per image patch."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def kl_divergence(
    mean: torch.Tensor, logvar: torch.Tensor, average: Callable[[torch.Tensor], torch.Tensor] = torch.mean
) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element, averaged (by ``average``: a rank's share of the
    global batch's mean under torchrun)."""
    return 0.5 * average(mean.pow(2) + logvar.exp() - 1.0 - logvar)


@torch.no_grad()
def normalize_latents(vae: AutoencoderKL, images: torch.Tensor, scale: float, batch: int = 64) -> float:
    """Rescale the latent space so that (latent mean x scale) has unit standard deviation; returns a."""
    means = []
    for i in range(0, len(images), batch):
        means.append(vae.encode_moments(to_model_range(images[i : i + batch]).to(vae.dtype))[0].float())
    std = float(torch.cat(means).std())
    a = 1.0 / (std * scale)
    z = vae.config.embed_dim
    vae.quant_conv.weight[:z] *= a
    vae.quant_conv.bias[:z] *= a
    vae.quant_conv.bias[z:] += 2 * math.log(a)  # the posterior's std scales by a too
    vae.post_quant_conv.weight[:, :z] /= a
    return a


def train_vae(
    cfg: TrainConfig,
    progress: Callable | None = None,
    stop_after: int | None = None,
    ctx: distributed.Distributed | None = None,
) -> Path:
    """Train as ``cfg`` says; returns the VAE file. ``ctx``: this process's rank in a data-parallel run
    (train/distributed.py: each rank encodes its slice of the global batch, the posterior noise is drawn
    for the whole batch, every mean is taken over the whole batch); None: one process."""
    ctx = ctx or distributed.Distributed(device=torch.device(cfg.device))
    device = ctx.device
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    fam = get_family(cfg.model.family)
    torch.manual_seed(cfg.model.init_seed)
    vae = AutoencoderKL(fam.vae, fam.latent_scale).to(device)
    modules: dict[str, nn.Module] = {"vae": vae}
    optimizers = {"vae": common.make_optimizer(vae.parameters(), cfg)}
    use_disc = cfg.vae.disc_weight > 0
    if use_disc:
        disc = PatchDiscriminator().to(device)
        modules["disc"] = disc
        optimizers["disc"] = common.make_optimizer(disc.parameters(), cfg)
    ema = common.EMA({"vae": vae}, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if cfg.resume and common.has_state(out):
        start, extra = common.load_state(out, modules, optimizers, ema, cfg)
        distributed.check_resume(extra, ctx)
    images, _, _ = load_dataset(cfg.data)  # after the state: a bad state is reported before the data is read
    n = len(images)
    amp = common.autocast_dtype(cfg, device)
    reporter = common.Reporter(progress, cfg.log_every, cfg.steps, cfg.batch_size)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    b, part = cfg.batch_size, ctx.part(cfg.batch_size)

    def avg(t: torch.Tensor) -> torch.Tensor:  # the mean over the whole batch, of which t is a slice
        return t.mean() if ctx.world == 1 else t.sum() / (b * t[0].numel())

    for step in range(start, end):
        vae.train()
        lr = common.lr_at(step, cfg)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        g = common.deterministic_generator(cfg.seed, step)
        x = to_model_range(images[sample_order(n, cfg.seed, step * b, b)[part]]).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            mean, logvar = vae.encode_moments(x)
            noise = torch.randn((b, *mean.shape[1:]), generator=g)[part]  # example i's noise on any rank
            z = mean + torch.exp(0.5 * logvar) * noise.to(device)
            rec = vae.decoder(vae.post_quant_conv(z)).float()
        loss = avg((rec - x).abs()) + cfg.vae.l2_weight * avg((rec - x).pow(2))
        loss = loss + cfg.vae.kl_weight * kl_divergence(mean.float(), logvar.float(), avg)
        gan_on = use_disc and step >= cfg.vae.disc_start
        if gan_on:
            loss = loss - cfg.vae.disc_weight * avg(disc(rec))
        loss.backward()
        ctx.sum_grads(list(vae.parameters()))
        total = ctx.sum(float(loss.detach()))
        common.check_step(step, total, common.grad_norm(list(vae.parameters()), cfg.grad_clip), cfg, out)
        optimizers["vae"].step()
        optimizers["vae"].zero_grad(set_to_none=True)
        if use_disc:
            optimizers["disc"].zero_grad(set_to_none=True)
            if gan_on:  # hinge loss
                d_loss = avg(F.relu(1 - disc(x))) + avg(F.relu(1 + disc(rec.detach())))
                d_loss.backward()
                ctx.sum_grads(list(disc.parameters()))
                d_norm = common.grad_norm(list(disc.parameters()), 0.0)
                common.check_step(step, ctx.sum(float(d_loss.detach())), d_norm, cfg, out)
                optimizers["disc"].step()
                optimizers["disc"].zero_grad(set_to_none=True)
        if ema is not None:
            ema.update({"vae": vae}, step)
        reporter.step(step, total, lr)
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            common.check_weights(step, modules, ema, cfg, out)  # nothing is written from non-finite weights
            if ctx.main:  # only rank 0 writes; every rank holds the same weights
                common.save_state(out, done, modules, optimizers, ema, cfg, {"world_size": ctx.world})
    final = out / "vae.safetensors"
    if end == cfg.steps and ctx.main:
        if ema is not None:
            ema.copy_to({"vae": vae})
        vae.eval()
        if cfg.vae.normalize_latents:
            a = normalize_latents(vae, images.to(device), fam.latent_scale)
            log.info("latent space rescaled by %.4f for unit variance at scale %g", a, fam.latent_scale)
        state = {"first_stage_model." + k: v.detach().cpu() for k, v in vae.state_dict().items()}
        write_safetensors(state, final, metadata={"latentforge.family": fam.name}, overwrite=True)
    return final
