"""Seeded noise: the same seed gives the same latent on every device.

A1111's semantics: image i of a batch has its own generator seeded with seed + i (on the CPU by
default; A1111's "GPU" and "NV" sources are reproduced by computing CUDA's Philox generator here);
the starting noise and every later draw of an ancestral/SDE sampler come from it in order; variation
seeds, seed resize and ENSD as A1111's ImageRNG.
SDE samplers that A1111/ComfyUI drive with a Brownian tree (torchsde) get one tree per image seeded
with the image's seed.

ComfyUI's convention ("comfy batch", comfy/sample.py ``prepare_noise``): the starting noise of the whole
batch is one ``torch.randn((B, C, H, W))`` from ``torch.manual_seed(seed)`` on the CPU; the later draws
of ancestral samplers come from one generator on the latents' device seeded with seed (seed + 1 on the
CPU), each draw also batch-shaped; the SDE samplers' noise from one Brownian tree over the whole batch
(entropy = seed). Images after the first therefore depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from latentforge.device import to_device

COMFY_BATCH = "comfy batch"
RNG_SOURCES = ("CPU", "GPU", "NV", COMFY_BATCH)
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds (A1111 and ComfyUI pass theirs straight on)


def seed_bits(seed: int) -> int:
    """The 64-bit seed a generator gets: torch's own reading of a negative seed (-1 is 2^64 - 1), carried on
    past 2^64 - 1 so that an offset (ENSD, ComfyUI's + 1, the x4 upscaler's - 10) cannot overflow."""
    return int(seed) % (MAX_SEED + 1)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): ``counter``
    (4, N) and ``key`` (2, N) uint32 -> (4, N) uint32 random words. The counter-based generator behind
    CUDA's ``torch.randn``."""
    c = [counter[i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[0].astype(np.uint64), key[1].astype(np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    for r in range(rounds):
        p0 = c[0] * np.uint64(_PHILOX_M[0])
        p1 = c[2] * np.uint64(_PHILOX_M[1])
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        if r < rounds - 1:
            k0 = (k0 + np.uint64(_PHILOX_W[0])) & mask
            k1 = (k1 + np.uint64(_PHILOX_W[1])) & mask
    return np.stack(c).astype(np.uint32)


class PhiloxGenerator:
    """Normal noise as CUDA's ``torch.randn`` makes it, computed on the CPU (A1111's "NV" source): draw k
    of a seed uses Philox counters (k, 0, i, 0) for element i and key = the 64-bit seed, and turns the
    first two words of each block into one normal number by the Box-Muller transform in float32."""

    def __init__(self, seed: int):
        self.seed = seed_bits(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> Tensor:
        n = int(np.prod(shape)) if len(shape) else 1
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.array([[self.seed & 0xFFFFFFFF], [self.seed >> 32]], dtype=np.uint32).repeat(n, axis=1)
        words = philox4x32(counter, key)
        inv = np.float32(2.3283064e-10)  # 2^-32 as float32
        inv_2pi = np.float32(2.3283064e-10 * 6.2831855)
        u = words[0].astype(np.float32) * inv + inv / np.float32(2)
        v = words[1].astype(np.float32) * inv_2pi + inv_2pi / np.float32(2)
        out = (np.sqrt(np.float32(-2.0) * np.log(u)) * np.sin(v)).astype(np.float32)
        return torch.from_numpy(out.reshape(tuple(shape)))


@dataclass(frozen=True)
class NoiseOptions:
    """A1111's noise settings. ``source``: "CPU" (torch's CPU generator; latentforge's default), "GPU"
    (CUDA's torch.randn: real on a CUDA device, else computed as "NV"), "NV" (CUDA's generator computed on
    the CPU), "comfy batch" (ComfyUI's KSampler: one generator for the whole batch, see the module text;
    variation seeds, seed resize and ENSD do not apply to it). ``subseed_strength``: variation seeds, slerp
    from the seed's noise towards the subseed's.
    ``seed_resize_from``: (width, height) in pixels whose noise is placed centred in this size's.
    ``eta_noise_seed_delta`` (ENSD): draws after the first come from generators seeded with seed + delta."""

    source: str = "CPU"
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    eta_noise_seed_delta: int = 0
    latent_factor: int = 8  # pixels per latent cell, for seed_resize_from


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's spherical interpolation of variation seeds, norms taken along dim 1 of (C, H, W) noise,
    linear when the two are nearly parallel."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """Per-image generators; ``next()`` draws one noise tensor for the whole batch (B, C, H, W), A1111's
    ImageRNG: the first draw applies variation seeds and seed resize, later draws continue each image's
    generator (re-seeded with seed + ENSD when that is set)."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        *,
        subseeds: Sequence[int] | None = None,
        options: NoiseOptions | None = None,
        device: str | torch.device = "cpu",
        out_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.shape = tuple(shape)  # one image's latent, (C, H, W)
        self.device = torch.device(device)
        self.out_device = torch.device(out_device)
        self.dtype = dtype
        self.options = options or NoiseOptions()
        if self.options.source not in RNG_SOURCES:
            raise ValueError(f"unknown noise source {self.options.source!r}; use one of {', '.join(RNG_SOURCES)}")
        self.seeds = [int(s) for s in seeds]
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.first = True
        if self.options.source == COMFY_BATCH:
            self._check_comfy()
            self.generators = [torch.Generator(device="cpu").manual_seed(self.seeds[0])]
            return
        self.generators = [self._generator(s) for s in self.seeds]

    def _check_comfy(self) -> None:
        o = self.options
        for name, used in (
            ("subseed_strength", o.subseed_strength != 0),
            ("seed_resize_from", o.seed_resize_from is not None),
            ("eta_noise_seed_delta", o.eta_noise_seed_delta != 0),
        ):
            if used:
                raise ValueError(
                    f"{name} is A1111's per-image noise setting and does not apply to the noise source "
                    f"{COMFY_BATCH!r} (ComfyUI's whole-batch noise); remove it or choose rng CPU, GPU or NV"
                )
        if not self.seeds:
            raise ValueError(f"the noise source {COMFY_BATCH!r} needs the batch's first seed; no seeds were given")

    def _comfy_next(self) -> Tensor:
        """ComfyUI's draws: the batch's starting noise from torch.manual_seed(seed) on the CPU, later draws
        from a generator on the output device seeded with seed (seed + 1 on the CPU)."""
        shape = (len(self.seeds), *self.shape)
        if self.first:
            self.first = False
            noise = torch.randn(shape, generator=self.generators[0], dtype=torch.float32)
            later = self.out_device if self.out_device.type == "cuda" else torch.device("cpu")
            offset = 0 if later.type == "cuda" else 1
            self.generators = [torch.Generator(device=later).manual_seed(seed_bits(self.seeds[0] + offset))]
        else:
            gen = self.generators[0]
            noise = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
        return to_device(noise, self.out_device, self.dtype)

    def _generator(self, seed: int):
        source = self.options.source
        if source == "GPU" and self.out_device.type == "cuda":
            return torch.Generator(device=self.out_device).manual_seed(int(seed))
        if source in ("GPU", "NV"):
            return PhiloxGenerator(seed)
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _draw(self, generator, shape, on_device: bool = False) -> Tensor:
        """One image's draw, on the CPU (or, ``on_device``, where its generator is)."""
        if isinstance(generator, PhiloxGenerator):
            return generator.randn(shape)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise if on_device else noise.cpu()

    def _first(self) -> list[Tensor]:
        o = self.options
        resize = o.seed_resize_from
        shape = self.shape
        small = shape if not resize else (shape[0], resize[1] // o.latent_factor, resize[0] // o.latent_factor)
        draws = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            noise = self._draw(gen, shape) if small == shape else self._draw(self._generator(seed), small)
            if self.subseeds is not None and o.subseed_strength != 0:
                sub = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = slerp(o.subseed_strength, noise, self._draw(self._generator(sub), small))
            if small != shape:  # the small noise centred in (or cropped to) the full size
                full = self._draw(gen, shape)
                dy, dx = (shape[1] - small[1]) // 2, (shape[2] - small[2]) // 2
                h = small[1] if dy >= 0 else small[1] + 2 * dy
                w = small[2] if dx >= 0 else small[2] + 2 * dx
                ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
                full[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
                noise = full
            draws.append(noise)
        if o.eta_noise_seed_delta:
            self.generators = [self._generator(seed_bits(s + o.eta_noise_seed_delta)) for s in self.seeds]
        return draws

    def next(self) -> Tensor:
        if self.options.source == COMFY_BATCH:
            return self._comfy_next()
        if self.first:
            self.first = False
            draws = self._first()
        else:
            draws = [self._draw(g, self.shape, on_device=True) for g in self.generators]
        return to_device(torch.stack(draws), self.out_device, self.dtype)

    def __call__(self, sigma=None, sigma_next=None) -> Tensor:
        return self.next()


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(float(value), dtype=torch.float32)


class BrownianNoise:
    """Noise from per-image Brownian trees (torchsde), as k-diffusion's BrownianTreeNoiseSampler:
    the increment W(sigma_next) - W(sigma) divided by sqrt(|sigma_next - sigma|).

    Brownian paths are rough: moving a query time by 1e-7 changes the increment by ~sqrt(1e-7). Times
    are therefore rounded to float32, the precision A1111, ComfyUI and diffusers query the tree with.
    ``whole_batch``: ComfyUI's KSampler convention, one tree over the batch's shape seeded with the first
    seed (its BrownianTreeNoiseSampler given one seed)."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        sigma_min: float,
        sigma_max: float,
        *,
        out_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        whole_batch: bool = False,
    ):
        import torchsde

        self.out_device, self.dtype = torch.device(out_device), dtype
        self.whole_batch = whole_batch
        t0, t1 = _f32(sigma_min), _f32(sigma_max)
        if whole_batch:
            w0 = torch.zeros((len(seeds), *shape))
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seeds[0]))]
        else:
            w0 = torch.zeros(shape)
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma, sigma_next) -> Tensor:
        a, b = _f32(sigma), _f32(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        if self.whole_batch:
            w = self.trees[0](lo, hi) * sign
        else:
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return to_device(w / (b - a).abs().sqrt(), self.out_device, self.dtype)
