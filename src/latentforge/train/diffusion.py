"""Training the noise predictor (and optionally the text encoder) with the eps or v objective.

One step: latents x0 of a batch, training timesteps t ~ U{0..999}, x = x0 + sigma_t * noise, the
network sees c_in x and t and is trained towards (x0 - c_skip x) / c_out, the same preconditioning
``ModelDenoiser`` uses when sampling (eps: the noise, v: the velocity). Optional min-SNR weighting.
Every random draw is a function of (seed, step, micro-batch), and the data order a function of the
sample position, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from latentforge.families import get_family
from latentforge.nn import packed
from latentforge.pipeline import Pipeline
from latentforge.sampling import Cond, ModelDenoiser
from latentforge.train import common, distributed, dreambooth
from latentforge.train.config import ConfigError, TrainConfig
from latentforge.train.data import bucket_batch, check_folder, load_dataset, sample_order, shuffle_tags, to_model_range

log = logging.getLogger("latentforge")


def init_unet(unet: nn.Module) -> None:
    """LDM's initialisation: the last layer of each residual branch and the output start at zero."""
    from latentforge.models.unet import ResBlock, SpatialTransformer

    for m in unet.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.out_layers[3].weight)
            nn.init.zeros_(m.out_layers[3].bias)
        elif isinstance(m, SpatialTransformer):
            nn.init.zeros_(m.proj_out.weight)
            nn.init.zeros_(m.proj_out.bias)
    nn.init.zeros_(unet.out[2].weight)
    nn.init.zeros_(unet.out[2].bias)


def init_text_encoder(enc: nn.Module) -> None:
    """CLIP's initialisation of the embeddings (normal, std 0.02)."""
    nn.init.normal_(enc.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(enc.embeddings.position_embedding.weight, std=0.01)


def build_pipeline(cfg: TrainConfig, device: torch.device) -> Pipeline:
    """The model to train: a checkpoint (fine-tuning) or a new model of a family with a trained VAE."""
    import latentforge
    from latentforge.loading import load_vae
    from latentforge.models import CLIPTextModel, CLIPTokenizer, UNet
    from latentforge.pipeline import LoadInfo

    if cfg.model.base == "demo":  # the bundled demo model (the demo adapters' recipes train on it)
        from latentforge.demo import bundled_model_path

        return latentforge.load(bundled_model_path(), dtype=torch.float32, device=device)
    if cfg.model.base:
        return latentforge.load(cfg.model.base, dtype=torch.float32, device=device)
    fam = get_family(cfg.model.family)
    if not cfg.model.vae:
        raise ConfigError("a new model needs model.vae: train one first with mode = 'vae' (see recipes/)")
    torch.manual_seed(cfg.model.init_seed)
    unet = UNet(fam.unet)
    init_unet(unet)
    encoders = []
    for spec in fam.text:
        enc = CLIPTextModel(spec.config)
        init_text_encoder(enc)
        encoders.append(enc)
    vae = load_vae(cfg.model.vae, fam, dtype=torch.float32, device=device)
    tokenizers = tuple(CLIPTokenizer(pad_id=spec.pad_id) for spec in fam.text)
    info = LoadInfo("new model", "new", f"new {fam.name} model", f"family default ({fam.prediction})", cfg.model.vae)
    return Pipeline(
        fam, fam.prediction, unet.to(device), vae, tuple(e.to(device) for e in encoders), tokenizers, info=info
    )


def encode_captions(pipe: Pipeline, captions: list[str], size: int, height: int | None = None) -> Cond:
    """Conditioning for a batch of captions through the same text conditioner and family conditioner
    as generation (captions read plainly, truncated at 77 tokens); differentiable through trainable
    text encoders. Images of ``size`` x ``height`` (default square) pixels give the SDXL size numbers."""
    emb = pipe.text.encode(captions, syntax="plain", device=pipe.device)
    return pipe.family.conditioner.build(
        emb.context, emb.pooled, width=size, height=height or size, adm_channels=pipe.unet.config.adm_in_channels
    )


@torch.no_grad()
def encode_images(pipe: Pipeline, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents (posterior means) of uint8 images, computed once for the whole run."""
    out = []
    for i in range(0, len(images), batch):
        x = to_model_range(images[i : i + batch]).to(pipe.device, pipe.vae.dtype)
        out.append(pipe.vae.encode(x).float())
    return torch.cat(out)


def _swap_in_ema(ema: common.EMA | None, modules: dict[str, nn.Module]):
    """Copy EMA weights in; returns the raw weights to restore."""
    if ema is None:
        return None
    saved = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    ema.copy_to(modules)
    return saved


def _restore(saved, modules: dict[str, nn.Module]) -> None:
    if saved is not None:
        for n, m in modules.items():
            m.load_state_dict(saved[n])


def save_samples(pipe: Pipeline, cfg: TrainConfig, path: Path) -> Path:
    from PIL import Image

    from latentforge.io.images import save_png

    images = []
    for i, prompt in enumerate(cfg.sample_prompts):
        result = pipe.txt2img(
            prompt,
            steps=cfg.sample_steps,
            seed=cfg.seed + i,
            width=cfg.data.resolution,
            height=cfg.data.resolution,
            sampler="DPM++ 2M",
        )
        images.append(result.images[0])
    r = cfg.data.resolution
    grid = Image.new("RGB", (r * len(images), r))
    for i, im in enumerate(images):
        grid.paste(im, (i * r, 0))
    grid.info["parameters"] = " | ".join(cfg.sample_prompts)
    return save_png(grid, path, overwrite=True)


def diffusion_loss(
    pipe: Pipeline,
    denoiser: ModelDenoiser,
    x0: torch.Tensor,
    captions: list[str],
    g: torch.Generator,
    cfg: TrainConfig,
    amp: torch.dtype | None,
    pixels: tuple[int, int] | None = None,
    part: slice | None = None,
    weights: torch.Tensor | None = None,
    *,
    control: Callable | None = None,
) -> torch.Tensor:
    """The training loss of one batch: t ~ U{0..N-1}, x = x0 + sigma_t noise, network output against
    the denoiser's target (eps or v), optionally min-SNR weighted; all random draws from ``g``.
    ``pixels``: the images' (width, height) when not square at ``data.resolution`` (buckets).
    ``part``: compute only these examples (one rank's share, train/distributed.py): the draws are still
    made for the whole batch, and the loss is their sum divided by the whole batch's size.
    ``control``: a function (network input, timesteps, Cond) -> ``ControlResiduals`` for the UNet
    (ControlNet training), for the examples computed (``part`` already applied).
    ``weights``: per-sample weights (whole batch) of a weighted sum instead of the mean (DreamBooth's
    prior loss); with ``part``, that part's share of the sum."""
    device = x0.device
    sigmas = denoiser.schedule.sigmas.float()
    t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    if cfg.model.noise_offset > 0:  # kohya's noise offset (Guttenberg 2023): a per-channel constant shift
        noise = noise + cfg.model.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
    whole = x0.shape[0]
    if part is not None:
        x0, t, noise, captions = x0[part], t[part], noise[part], captions[part]
    noise = noise.to(device)
    sigma = sigmas[t].to(device)[:, None, None, None]
    x = x0 + sigma * noise
    c_in = denoiser.scalings(sigma)[2]
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        with torch.set_grad_enabled(text_trains(cfg) and torch.is_grad_enabled()):
            w, h = (cfg.data.resolution,) * 2 if pixels is None else pixels
            cond = encode_captions(pipe, captions, w, h)
        inp, tt = x * c_in, t.float().to(device)
        pred = pipe.unet(
            inp, tt, cond.context, cond.vector, control=None if control is None else control(inp, tt, cond)
        )
    target = denoiser.target(x0, x, sigma)
    per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
    if cfg.model.min_snr_gamma > 0:
        snr = 1 / sigma.flatten() ** 2
        weight = snr.clamp(max=cfg.model.min_snr_gamma) / (snr + 1 if denoiser.prediction == "v" else snr)
        per_sample = per_sample * weight
    if weights is not None:
        return (per_sample * (weights if part is None else weights[part]).to(per_sample.device)).sum()
    return per_sample.mean() if part is None else per_sample.sum() / whole


def text_trains(cfg: TrainConfig) -> bool:
    """Whether captions must be encoded with gradients (something in the text path is trained)."""
    if cfg.mode == "lora":
        return cfg.lora.text_encoder
    return cfg.mode == "embedding" or cfg.model.train_text_encoder


def _trainables(cfg: TrainConfig, pipe: Pipeline):
    """(modules to train and save in the state, the adapter or None) for the config's mode. Adapter modes
    freeze every network; the adapter is attached to the model's forward."""
    if cfg.mode == "diffusion":
        modules: dict[str, nn.Module] = {"unet": pipe.unet}
        if cfg.model.train_text_encoder:
            modules.update({f"text{i}": enc for i, enc in enumerate(pipe.text_encoders)})
        for enc in pipe.text_encoders:
            enc.requires_grad_(cfg.model.train_text_encoder)
        pipe.unet.requires_grad_(True)
        return modules, None
    for net in pipe.networks().values():
        net.requires_grad_(False)
    if cfg.mode == "lora":
        from latentforge.train.lora import build_network

        adapter = build_network(pipe, cfg.lora, cfg.seed)
        adapter.attach()
        return {"lora": adapter}, adapter
    if cfg.mode == "controlnet":
        from latentforge.train.controlnet import ControlNetTraining

        adapter = ControlNetTraining(pipe, cfg)
        return {"controlnet": adapter.net}, adapter
    from latentforge.train.embedding import EmbeddingVectors

    adapter = EmbeddingVectors(pipe, cfg.embedding)
    adapter.attach(pipe)
    return {"embedding": adapter}, adapter


def _save_result(cfg: TrainConfig, pipe: Pipeline, adapter, path: Path, step: int, n: int, captions) -> Path:
    """Write what was trained: a model (diffusion), a kohya LoRA file, or the embedding's A1111 files."""
    if cfg.mode == "lora":
        from latentforge.train.data import tag_frequency
        from latentforge.train.lora import lora_metadata, save_lora

        return save_lora(adapter, path, lora_metadata(pipe, cfg, step, n, tag_frequency(captions)))
    if cfg.mode == "controlnet":
        return adapter.save(path, pipe, cfg, step)
    if cfg.mode == "embedding":
        path.mkdir(parents=True, exist_ok=True)
        return adapter.save(path, step, cfg.model.base)[0]
    return pipe.save(path, overwrite=True)


def _result_path(cfg: TrainConfig, out: Path, done: int | None) -> Path:
    tail = "" if done is None else f"-{done:06d}"
    if cfg.mode == "lora":
        return out / f"{cfg.lora.output_name}{tail}.safetensors"
    if cfg.mode == "controlnet":
        return out / f"{cfg.controlnet.output_name}{tail}.safetensors"
    if cfg.mode == "embedding":
        return out if done is None else out / f"step{tail}"
    return out / ("model.safetensors" if done is None else f"checkpoint{tail}.safetensors")


def train_diffusion(
    cfg: TrainConfig,
    progress: Callable | None = None,
    stop_after: int | None = None,
    ctx: distributed.Distributed | None = None,
) -> Path:
    """Train as ``cfg`` says; returns the path of the final checkpoint. ``stop_after`` ends the run
    after that many steps of this call (used to test resuming). ``ctx``: this process's rank in a
    data-parallel run (train/distributed.py); None: one process."""
    ctx = ctx or distributed.Distributed(device=torch.device(cfg.device))
    device = ctx.device
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    data = dreambooth.instance_data(cfg)
    check_folder(data)  # an empty or uncaptioned folder is refused before any model is loaded
    dreambooth.check(cfg)
    pipe = build_pipeline(cfg, device)
    if pipe.family.conditioner.concat_channels:
        raise ConfigError(f"training {pipe.family.name} models (extra input channels) is not supported yet")
    modules, adapter = _trainables(cfg, pipe)  # a LoRA rank that does not fit is refused here, before any work
    dreambooth.ensure_class_images(cfg, pipe, progress, adapter, ctx)  # by the base model, before training
    for net in pipe.networks().values():  # weights the class images' generations left packed: plain again
        packed.settle(net)
    if cfg.model.objective:
        pipe.prediction = cfg.model.objective
    pipe.vae.requires_grad_(False).eval()
    pipe.unet.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = common.make_optimizer(params, cfg)
    ema = common.EMA(modules, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if cfg.resume and common.has_state(out):
        start, extra = common.load_state(out, modules, {"opt": opt}, ema, cfg)
        log.info("resumed from %s at step %d", out / common.STATE_DIR, start)
        distributed.check_resume(extra, ctx)
    # the data after the state: a state that cannot be resumed is reported before minutes of encoding
    if cfg.mode == "controlnet":  # image / control image / caption triples; the control images stay in the adapter
        images, captions = adapter.load_data(cfg)
    else:
        images, captions, _ = load_dataset(data)
    shapes = None
    if isinstance(images, list):  # aspect-ratio buckets: latents of different sizes
        latents = [encode_images(pipe, im[None]).cpu()[0] for im in images]
        shapes = [tuple(x.shape) for x in latents]
        factor = images[0].shape[-1] // latents[0].shape[-1]
    else:
        latents = encode_images(pipe, images).cpu()
    del images
    prior = dreambooth.load_prior(cfg, lambda x: encode_images(pipe, x).cpu())  # None without prior preservation
    n = len(captions)
    log.info("training on %d images (latents %s)", n, sorted(set(shapes)) if shapes else tuple(latents.shape[1:]))
    if cfg.mode == "embedding":
        captions = [adapter.caption(c) for c in captions]

    schedule = pipe.noise_schedule()
    denoiser = ModelDenoiser(pipe.unet, schedule, pipe.prediction)
    amp = common.autocast_dtype(cfg, device)
    reporter = common.Reporter(progress, cfg.log_every, cfg.steps, cfg.batch_size * cfg.grad_accum)
    b, accum = cfg.batch_size, cfg.grad_accum
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        for m in modules.values():
            m.train()
        lr = common.lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(accum):
            g = common.deterministic_generator(cfg.seed, step, micro)
            pixels = None
            if shapes is None:
                idx = sample_order(n, cfg.seed, (step * accum + micro) * b, b)
                x0 = latents[idx]
            else:
                idx = bucket_batch(shapes, b, cfg.seed, step * accum + micro)
                x0 = torch.stack([latents[i] for i in idx.tolist()])
                pixels = (x0.shape[-1] * factor, x0.shape[-2] * factor)
            drop = (torch.rand(len(idx), generator=g) < cfg.model.caption_dropout).tolist()
            caps = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
            if cfg.data.shuffle_tags:
                caps = [shuffle_tags(c, cfg.data.keep_tokens, g) for c in caps]
            if cfg.mode == "lora":
                adapter.resample(g)
            weights = None
            if prior is not None:  # DreamBooth: the class half of the batch and the weights of both halves
                x0, caps, weights = prior.extend(x0, caps, step * accum + micro)
            part = None if ctx.world == 1 else ctx.part(len(caps))
            if part is not None and part.start == part.stop:
                continue  # a bucket's batch smaller than the number of ranks: nothing on this one
            control = None
            if cfg.mode == "controlnet":
                control = adapter.control(idx if part is None else idx[part], device)
            loss = (
                diffusion_loss(pipe, denoiser, x0.to(device), caps, g, cfg, amp, pixels, part, weights, control=control)
                / accum
            )
            loss.backward()
            total += float(loss.detach())
        ctx.sum_grads(params)  # the gradient of the global batch's mean loss on every rank
        total = ctx.sum(total)
        common.check_step(step, total, common.grad_norm(params, cfg.grad_clip), cfg, out)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(modules, step)
        reporter.step(step, total, lr)
        done = step + 1
        sample = bool(cfg.sample_every and done % cfg.sample_every == 0)
        save = bool((cfg.save_every and done % cfg.save_every == 0) or done == end)
        if sample or save:  # nothing is written from non-finite weights
            common.check_weights(step, modules, ema, cfg, out)
        if sample and ctx.main:
            grid = out / "samples" / f"step-{done:06d}.png"
            _with_ema(ema, modules, lambda grid=grid: save_samples(pipe, cfg, grid))
        if save and ctx.main:  # only rank 0 writes; every rank holds the same weights
            common.save_state(out, done, modules, {"opt": opt}, ema, cfg, {"world_size": ctx.world})
            if done % max(cfg.save_every, 1) == 0 or done == cfg.steps:
                path = _result_path(cfg, out, done)
                _with_ema(ema, modules, lambda p=path, d=done: _save_result(cfg, pipe, adapter, p, d, n, captions))
    final = _result_path(cfg, out, None)
    if end == cfg.steps and ctx.main:
        final = _with_ema(ema, modules, lambda: _save_result(cfg, pipe, adapter, final, end, n, captions))
    elif cfg.mode == "embedding":
        final = out / f"{adapter.token}.safetensors"
    return final


def _with_ema(ema, modules, fn):
    for m in modules.values():
        m.eval()
    saved = _swap_in_ema(ema, modules)
    try:
        with torch.no_grad():
            return fn()
    finally:
        _restore(saved, modules)
