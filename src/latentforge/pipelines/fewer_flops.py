"""Options that trade image fidelity for fewer FLOPs, off by default: DeepCache and token merging.

- DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): on *cache* steps the
  whole UNet runs and the features entering the output side at the chosen skip branch are kept
  (``models.unet.FeatureCache``); on the other steps only the shallow blocks run and take the kept deep
  features. Cache steps: every ``deepcache_interval``-th step of a pass (uniform 1:N), or the paper's
  non-uniform 1:N schedule, denser around the middle step. The step of a call is found from its sigma in
  the pass's schedule (a second-order sampler's extra call belongs to the step of its sigma). Each UNet
  call of a guided call (cond/uncond run apart when their lengths differ) and each batch size has its
  own cache; NGMS's cond-only calls take the cond rows of the CFG batch's features. A call with nothing
  kept since the last cache step, or kept at another size, runs the whole UNet and keeps its features.
- Token merging (ToMe for SD, Bolya & Hoffman 2023; ``nn.tome``) as A1111 applies it: the self-attention
  tokens of the transformer blocks without downsampling (max_downsample 1; ``token_merging_max_downsample``
  2 reaches the second level, where SDXL's first attention is), 2 x 2 regions, merged for attention only
  (not cross-attention or the MLP); destinations at each region's top left, or with
  ``token_merging_random`` drawn from a generator seeded with the batch's first seed (tomesd's use_rand,
  which like tomesd is used only for even batches, where the CFG halves pair up).

Both act on the loaded UNet through the patcher (source "fewer-flops", taken back after the request) and on
each pass through a denoiser wrapper that says which pass is running; the refiner's UNet is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentforge.models.unet import FeatureCache
from latentforge.nn.tome import bipartite_merge
from latentforge.pipelines.plan import Plan
from latentforge.pipelines.request import GenerationRequest, RequestError

SOURCE = "fewer-flops"
STRIDE = 2  # tomesd's sx = sy = 2
NONUNIFORM_POWER = 1.2  # DeepCache's non-uniform schedule: the power it starts from


def cache_steps(steps: int, interval: int, schedule: str = "uniform") -> list[int]:
    """The steps (0-based) of a pass of ``steps`` on which DeepCache runs the whole UNet.

    Uniform: every ``interval``-th step from the first. Non-uniform (the paper's section 3.3): the same
    number of cache steps, ceil(steps / interval), at ``c + sign(l) |l|^p`` (truncated) for l evenly spaced
    from -c^(1/p) to (steps - c)^(1/p), with c the middle step, so they are denser around it; p starts at
    1.2 and is lowered by 0.02 until the steps are distinct (uniform if none is)."""
    if interval <= 1:
        return list(range(steps))
    if schedule == "uniform":
        return list(range(0, steps, interval))
    count = math.ceil(steps / interval)
    center = steps // 2
    p = NONUNIFORM_POWER
    while p > 1:
        low, high = -(center ** (1 / p)), (steps - center) ** (1 / p)
        found = set()
        for k in range(count + 1):
            v = low + (high - low) * k / count
            found.add(center + int(math.copysign(math.floor(abs(v) ** p + 1e-9), v)))
        chosen = sorted(i for i in found if 0 <= i < steps)
        if len(chosen) == count and chosen[0] == 0:
            return chosen
        p -= 0.02
    return list(range(0, steps, interval))


@dataclass
class PassFlops:
    """What one pass asks of the hooks: its token merging ratio and its DeepCache steps."""

    sigmas: Tensor
    ratio: float = 0.0
    random: bool = False
    max_downsample: int = 1
    depth: int = 0
    cached_steps: frozenset[int] | None = None  # None: DeepCache off
    generator: torch.Generator | None = None
    # (UNet call of the guided call, batch size) -> (its cache, the cache step its features belong to)
    caches: dict[tuple[int, int], tuple[FeatureCache, int]] = field(default_factory=dict)
    call: int = 0  # UNet calls so far in the current guided call
    refresh: bool = True  # the current call's step is a cache step
    generation: int = 0  # cache steps so far
    last_step: int = -1

    def step(self, sigma: float) -> int:
        step = int((self.sigmas[:-1] >= sigma * (1 - 1e-6)).sum()) - 1
        return max(step, 0)

    def first_rows(self, key: tuple[int, int]) -> Tensor | None:
        """The first rows of features kept at this cache step for the same call with a larger batch."""
        call, batch = key
        for (c, b), (cache, generation) in self.caches.items():
            if c == call and b > batch and generation == self.generation and cache.features is not None:
                return cache.features[:batch]
        return None

    def start_batch(self, iteration: int, seeds: list[int]) -> None:
        self.caches.clear()
        self.generation, self.last_step = 0, -1
        if self.random:
            self.generator = torch.Generator().manual_seed(seeds[0])


class FewerFlops:
    """The request's hooks on the loaded UNet; ``current`` is the pass whose guided denoiser is running."""

    def __init__(self):
        self.current: PassFlops | None = None
        self.latent_tokens = 0

    def pre_forward(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        self.latent_tokens = x.shape[-2] * x.shape[-1]
        state = self.current
        if state is None or state.cached_steps is None:
            return None
        key = (state.call, x.shape[0])
        state.call += 1
        cache, generation = state.caches.get(key, (None, -1))
        if cache is None or state.refresh or generation != state.generation:
            cache = FeatureCache(state.depth)  # no features: this call runs the whole UNet and keeps them
            if not state.refresh:  # a cond-only call (NGMS): the cond rows, first in CFGDenoiser's batch
                cache.features = state.first_rows(key)
            state.caches[key] = (cache, state.generation)
        return args, {**kwargs, "cache": cache}

    def token_merge(self, x: Tensor, h: int, w: int):
        state = self.current
        if state is None or state.ratio <= 0:
            return _identity, _identity
        downsample = math.ceil(math.sqrt(self.latent_tokens // (h * w)))
        if downsample > state.max_downsample:
            return _identity, _identity
        generator = state.generator if state.random and x.shape[0] % 2 == 0 else None
        return bipartite_merge(x, h, w, state.ratio, sx=STRIDE, sy=STRIDE, generator=generator)

    def wrapper(self, state: PassFlops):
        def wrap(inner):
            def denoise(x: Tensor, sigma):
                previous, self.current = self.current, state
                state.call = 0
                if state.cached_steps is not None:
                    step = state.step(float(torch.as_tensor(sigma).reshape(-1)[0]))
                    state.refresh = step in state.cached_steps
                    state.generation += state.refresh and step != state.last_step
                    state.last_step = step
                try:
                    return inner(x, sigma)
                finally:
                    self.current = previous

            return denoise

        return wrap


def _identity(x: Tensor) -> Tensor:
    return x


def ratios(req: GenerationRequest, img2img: bool) -> tuple[float, float]:
    """(first pass, hires pass) token merging ratios, as A1111's ``get_token_merging_ratio``: img2img's
    own ratio or the general one; the hires pass's own or the first pass's."""
    first = (req.token_merging_ratio_img2img or req.token_merging_ratio) if img2img else req.token_merging_ratio
    return first, req.token_merging_ratio_hr or first


def wanted(req: GenerationRequest) -> bool:
    return bool(
        req.deepcache_interval
        or req.token_merging_ratio
        or req.token_merging_ratio_hr
        or req.token_merging_ratio_img2img
    )


def apply(plan: Plan, pipe, req: GenerationRequest, img2img: bool, others=()) -> bool:
    """Put the request's DeepCache and token merging on the passes that run the loaded UNet (or the UNet of
    one of ``others``: the hires pass's model, as A1111 applies token merging to the model it switched
    to), and their hooks on those UNets (call ``remove`` on each afterwards). Returns whether anything was
    applied. The refiner's pass is left alone."""
    if not wanted(req):
        return False
    runners = [pipe, *(o for o in others if o is not None and o is not pipe)]
    for runner in runners:
        blocks = len(runner.unet.input_blocks)
        if req.deepcache_interval and req.deepcache_depth >= blocks:
            raise RequestError(
                f"deepcache_depth must be 0 to {blocks - 1} for {runner.family.name} (its UNet has {blocks} "
                f"input blocks), got {req.deepcache_depth}"
            )
    first_ratio, hr_ratio = ratios(req, img2img)
    flops = FewerFlops()
    for p in plan.passes:
        if not any(p.model.unet is runner.unet for runner in runners):
            continue
        steps = cache_steps(p.steps, req.deepcache_interval, req.deepcache_schedule)
        state = PassFlops(
            p.sigmas.double().cpu(),
            ratio=hr_ratio if p.name == "hires" else first_ratio,
            random=req.token_merging_random,
            max_downsample=req.token_merging_max_downsample,
            depth=req.deepcache_depth,
            cached_steps=frozenset(steps) if req.deepcache_interval else None,
        )
        p.wrappers.append(flops.wrapper(state))
        p.before_batch.append(state.start_batch)
    for runner in runners:
        runner.patcher.add_hook(SOURCE, runner.unet, pre=flops.pre_forward, with_kwargs=True)
        if first_ratio or hr_ratio:
            runner.patcher.add_token_merge(SOURCE, flops.token_merge)
    plan.infotext.update(infotext(req, img2img, any(p.name == "hires" for p in plan.passes)))
    return True


def remove(pipe) -> None:
    pipe.patcher.remove(SOURCE)


def infotext(req: GenerationRequest, img2img: bool, hires: bool) -> dict:
    """A1111's "Token merging ratio" (the first pass's) and "Token merging ratio hr" (with a hires pass),
    and latentforge's DeepCache fields."""
    first, hr = ratios(req, img2img)
    merging = first or (hires and hr)
    md = req.token_merging_max_downsample
    out: dict = {
        "Token merging ratio": f"{first:g}" if first else None,
        "Token merging ratio hr": f"{hr:g}" if hires and hr else None,
        "Token merging random": True if merging and req.token_merging_random else None,
        "Token merging max downsample": req.token_merging_max_downsample if merging and md != 1 else None,
    }
    if req.deepcache_interval:
        out["DeepCache interval"] = req.deepcache_interval
        out["DeepCache depth"] = req.deepcache_depth
        out["DeepCache schedule"] = req.deepcache_schedule if req.deepcache_schedule != "uniform" else None
    return out
