"""Several requests run as one batch: each image keeps its own prompt, negative prompt and seeds, and the
UNet runs once per model call for all of them (the rows of every request side by side).

This is what a server does with queued jobs that share a model, a size and the sampler's settings (vLLM-style
request batching, applied to diffusion steps): the per-image parts (text conditioning, starting noise, the
noise of ancestral/SDE samplers, the init latents of img2img) are made for each request exactly as
``generate`` makes them alone, the plans' passes are merged row-wise (``merge_plans``), and the sampler runs
once over the merged batch. Each request's rows are decoded on their own, as a request alone is decoded.

What stays apart: on a CPU a batched matmul or convolution may sum in another order than the same rows in a
smaller batch, so an image equals its image alone within float rounding (differences of ~1e-6 in the UNet's
output; in pixels at most a few 8-bit levels), not always bit for bit. Requests that change the model (LoRA,
hypernetwork tags or ``networks``; tiling, which pads its convolutions circularly), need per-request
wrappers (ControlNet, inpainting masks, DeepCache and token merging), several passes
per request (``batch_count`` > 1), the refiner or the x4 upscaler, or an adaptive sampler (whose step size is
chosen from the error of the whole batch) never share a batch: ``batch_key`` returns None for them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from latentforge.conditioning.prompt import extract_network_tags
from latentforge.pipelines import fewer_flops, networks
from latentforge.pipelines.checks import hires_checkpoint, hires_request
from latentforge.pipelines.generate import (
    GenerationResult,
    Interrupted,
    Progress,
    build_plan,
    finish_result,
    pick_seeds,
    run_pass,
    with_default_cfg,
    work_size,
)
from latentforge.pipelines.images import open_image, tensor_to_images
from latentforge.pipelines.numerics import decode_checked
from latentforge.pipelines.plan import Pass, Plan
from latentforge.pipelines.request import GenerationRequest, HiresOptions, RequestError
from latentforge.sampling import CondSchedule, resolve
from latentforge.sampling.denoisers import Cond
from latentforge.threads import auto_threads

# fields each request of a batch keeps for itself; every other field must be equal
PER_IMAGE = frozenset({"prompt", "negative_prompt", "seed", "subseed", "batch_size", "extra"})
# samplers whose steps depend on the whole batch (the error norm of DPM adaptive's step-size control)
BATCH_DEPENDENT_SAMPLERS = frozenset({"dpm_adaptive"})


def batch_key(req: GenerationRequest, img2img: bool = False) -> tuple | None:
    """What two requests must share to run in one batch (compare with ``==``); None: this request always
    runs alone (see the module docstring for which)."""
    if req.batch_count != 1 or req.networks or req.control or fewer_flops.wanted(req) or req.tiling:
        return None  # (DeepCache and token merging hook the UNet per request, tiling pads its convolutions)
    if any(g is not None for g in (req.inpaint, req.depth, req.refiner, req.x4)):
        return None
    if req.hires is not None and hires_checkpoint(req.hires) is not None:
        return None  # another model for the hires pass: generate loads and runs it
    hires_prompt = getattr(req.hires, "prompt", "")
    for text in (req.prompt, hires_prompt):
        if not isinstance(text, str) or extract_network_tags(text)[1]:
            return None
    try:
        infos = [resolve(req.sampler, req.schedule)[0]]
        if isinstance(req.hires, HiresOptions):  # the hires pass's own sampler
            second = hires_request(req)
            infos.append(resolve(second.sampler, second.schedule)[0])
    except (ValueError, RequestError, TypeError, AttributeError):
        return None  # it fails validation alone, with its own message
    if any(info.name in BATCH_DEPENDENT_SAMPLERS for info in infos):
        return None
    fields = [f.name for f in dataclasses.fields(req) if f.name not in PER_IMAGE]
    shared = tuple((name, _hashable(getattr(req, name))) for name in fields)
    return ("img2img" if img2img else "txt2img", shared)


def _hashable(value):
    if dataclasses.is_dataclass(value):
        return repr(dataclasses.asdict(value))
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


@dataclass
class BatchMember:
    """One request of a batch: its init images (img2img) and its own progress callback. The callback may
    raise ``Interrupted``: that request is dropped and the others go on; its images are not made, or with
    ``partial`` they are the images being made (its last denoised estimate, as ``generate(partial=True)``)."""

    request: GenerationRequest
    init_images: Sequence[Image.Image | str | Path] | None = None
    progress: Callable[[Progress], None] | None = None
    partial: bool = False


@dataclass
class _Prepared:
    index: int
    member: BatchMember
    plan: Plan
    mode: str
    seeds: list[int]
    subseeds: list[int]
    chosen: tuple[int, int]
    start: float


def generate_batch(
    pipe, members: Sequence[BatchMember], upscaler_dirs: Sequence[str | Path] | None = None
) -> list[GenerationResult | Exception]:
    """Run ``members`` (requests of equal ``batch_key``) as few batches as their conditioning allows
    (usually one; prompts whose encoded lengths differ cannot share the UNet's context tensor). Returns, in
    order, each member's ``GenerationResult``, or the exception that stopped it: a ``RequestError`` of its
    own (checked before any sampling: one bad request never fails the others), ``Interrupted`` when its
    callback dropped it, or an error of the batch it ran in."""
    results: list[GenerationResult | Exception | None] = [None] * len(members)
    ready: list[_Prepared] = []
    for i, member in enumerate(members):
        try:
            ready.append(_prepare(pipe, i, member, upscaler_dirs))
        except Exception as e:  # reported for this member only
            results[i] = e
    while ready:  # greedy groups: every request that merges with the first one left
        group, rest = [ready[0]], []
        for p in ready[1:]:
            (group if merge_plans([*(g.plan for g in group), p.plan], _sizes([*group, p])) else rest).append(p)
        for p, outcome in zip(group, _run_group(pipe, group)):
            results[p.index] = outcome
        ready = rest
    return results  # type: ignore[return-value]


def _sizes(group: list[_Prepared]) -> list[int]:
    return [len(p.seeds) for p in group]


def _prepare(pipe, index: int, member: BatchMember, upscaler_dirs) -> _Prepared:
    """Validation, seeds, LoRA-free text conditioning and init latents of one request, as ``generate``."""
    start = time.perf_counter()
    req = member.request
    img2img = member.init_images is not None
    req.validate(img2img=img2img, upscaler_files=bool(upscaler_dirs))
    req = with_default_cfg(pipe, req)
    member = dataclasses.replace(member, request=req)  # the record and infotext carry the scale used
    if batch_key(req, img2img) is None:
        raise ValueError("this request cannot share a batch (see pipelines.batch.batch_key); run it with generate()")
    images_in = [open_image(i) for i in member.init_images] if img2img else None
    if img2img and not images_in:
        raise RequestError("img2img needs at least one init image")
    seed, subseed, seeds, subseeds = pick_seeds(req, req.batch_size)
    session = networks.activate(pipe, req)  # no LoRAs here (batch_key); the embeddings' hashes for the infotext
    try:
        with torch.inference_mode():
            plan = build_plan(pipe, session.request, images_in, None, upscaler_dirs)
        plan.infotext.update(session.infotext)
    finally:
        session.close(pipe)
    mode = "img2img" if img2img else "txt2img"
    return _Prepared(index, member, plan, mode, seeds, subseeds, (seed, subseed), start)


def _run_group(pipe, group: list[_Prepared]) -> list[GenerationResult | Exception]:
    sizes = _sizes(group)
    plan = merge_plans([p.plan for p in group], sizes)
    if plan is None:  # a single plan always merges with itself unless it has wrappers (excluded by batch_key)
        return [ValueError("this request's plan cannot run in a batch")] * len(group)
    rows, at = [], 0
    for n in sizes:
        rows.append(slice(at, at + n))
        at += n
    seeds = [s for p in group for s in p.seeds]
    subseeds = [s for p in group for s in p.subseeds]
    live = [True] * len(group)
    saved: dict[int, Tensor] = {}  # the last denoised rows of members stopped with ``partial``
    total = plan.total_steps
    first = group[0]
    work = work_size(pipe, first.member.request, None) * sum(sizes) / max(1, first.member.request.batch_size)
    try:
        with torch.inference_mode(), auto_threads(work, pipe.device.type):
            x, offset, stream = None, 0, None
            for p in plan.passes:

                def callback(i, x_i, sigma, denoised, offset=offset):
                    for j, member in enumerate(group):
                        if not live[j] or member.member.progress is None:
                            continue
                        try:
                            member.member.progress(
                                Progress(offset + i + 1, total, 0, 1, float(sigma), denoised[rows[j]], pipe)
                            )
                        except Interrupted:
                            live[j] = False  # dropped: its rows still run with the others, its image is not made
                            if member.member.partial:
                                saved[j] = denoised[rows[j]].clone()
                    if not any(live):
                        raise Interrupted()

                x, stream = run_pass(p, x, 0, seeds, subseeds, plan.noise, pipe.device, callback, stream)
                offset += p.steps
            return [_outcome(pipe, m, x[rows[j]] if live[j] else saved.get(j)) for j, m in enumerate(group)]
    except Interrupted:
        return [_outcome(pipe, m, saved.get(j)) for j, m in enumerate(group)]
    except Exception as e:  # sampling failed for the whole batch (a NaN, a broken model)
        return [e for _ in group]


def _outcome(pipe, member: _Prepared, latents: Tensor | None) -> GenerationResult | Exception:
    """A member's result from its rows' latents (decoded on their own, as alone: the VAE's batch is its
    batch), or ``Interrupted`` when it was stopped without keeping them; a decode error is its alone."""
    if latents is None:
        return Interrupted()
    try:
        with torch.inference_mode():
            images = tensor_to_images(decode_checked(member.plan.decode, latents), member.plan.finish_pixels)
        m = member
        return finish_result(pipe, m.member.request, m.plan, m.mode, m.seeds, m.chosen, images, m.start)
    except Exception as e:
        return e


def merge_plans(plans: Sequence[Plan], sizes: Sequence[int]) -> Plan | None:
    """One plan running ``plans`` side by side (request j's ``sizes[j]`` rows after the previous ones'), or
    None when they differ in anything but their conditioning and starting latents: size, sampler and
    sigmas, CFG settings, noise options, wrappers (ControlNet, masks), a continuing pass, or context
    tensors that cannot be concatenated (prompts of different chunk counts)."""
    base = plans[0]
    for p in plans:
        if p.postprocess is not None or p.finish_pixels is not None or len(p.passes) != len(base.passes):
            return None
        if (p.width, p.height, p.sampler.name, p.schedule, p.noise) != (
            base.width,
            base.height,
            base.sampler.name,
            base.schedule,
            base.noise,
        ):
            return None
        if p.decode != base.decode:
            return None
    passes = []
    for k in range(len(base.passes)):
        merged = _merge_passes([p.passes[k] for p in plans], sizes)
        if merged is None:
            return None
        passes.append(merged)
    return Plan(passes, base.width, base.height, base.decode, base.sampler, base.schedule, base.noise, None)


def _settings(p: Pass) -> tuple:
    m = p.model
    return (
        p.name,
        p.sampler.name,
        p.shape,
        p.cfg_scale,
        p.cfg_rescale,
        p.min_uncond_sigma,
        p.min_uncond_all,
        p.denoise,
        p.sgm_noise,
        p.noise_multiplier,
        tuple(sorted(p.sampler_options.items())),
        id(getattr(m, "unet", m)),
        getattr(m, "prediction", None),
        getattr(m, "quantize", None),
        p.uncond is None,
    )


def _merge_passes(passes: list[Pass], sizes: Sequence[int]) -> Pass | None:
    base = passes[0]
    for p in passes:
        if p.wrappers or p.finish is not None or p.batch_concat is not None or p.continues or p.noise_range:
            return None
        if not isinstance(p.cond, CondSchedule) or _settings(p) != _settings(base):
            return None
        if p.sigmas.shape != base.sigmas.shape or not torch.equal(p.sigmas, base.sigmas):
            return None
    cond = merge_schedules([p.cond for p in passes])
    uncond = None if base.uncond is None else merge_schedules([p.uncond for p in passes])
    if cond is None or (base.uncond is not None and uncond is None):
        return None
    return dataclasses.replace(base, cond=cond, uncond=uncond, start=_merged_start([p.start for p in passes], sizes))


def merge_schedules(schedules: Sequence[CondSchedule]) -> CondSchedule | None:
    """Row-wise concatenation of conditioning schedules (A1111 prompt editing, each request its own): the
    merged schedule changes wherever any of them does, and at model call k gives every request's
    ``at(k)`` stacked in order. None when the contexts (or vectors, extra channels) cannot be stacked."""
    ends = sorted({end for s in schedules for end, _ in s.entries})
    entries = []
    for end in ends:
        joined = join_conds([s.at(end) for s in schedules])  # constant on (previous end, end] for every s
        if joined is None:
            return None
        entries.append((end, joined))
    return CondSchedule(entries)


def join_conds(conds: Sequence[Cond]) -> Cond | None:
    """The rows of several ``Cond`` stacked (batch dimension), or None when their shapes do not fit."""
    first = conds[0]

    def fits(a: Tensor | None, b: Tensor | None) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device

    if not all(fits(c.context, first.context) and fits(c.vector, first.vector) for c in conds):
        return None
    if not all(fits(c.concat, first.concat) for c in conds):
        return None
    joined = first
    for c in conds[1:]:
        joined = joined.cat(c)
    return joined


def _merged_start(starts: list, sizes: Sequence[int]):
    def start(iteration: int, previous: Tensor | None, seeds: list[int]) -> Tensor | None:
        outs, at = [], 0
        for fn, n in zip(starts, sizes):
            prev = None if previous is None else previous[at : at + n]
            outs.append(fn(iteration, prev, seeds[at : at + n]))
            at += n
        if all(o is None for o in outs):
            return None
        if any(o is None for o in outs):
            raise ValueError("a merged pass mixes pure-noise and init-latent starts (merge_plans should refuse)")
        return torch.cat(outs)

    return start
