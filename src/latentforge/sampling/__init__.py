"""Noise schedules, denoisers, noise sources and the samplers."""

from latentforge.sampling.denoisers import CFGDenoiser, Cond, CondSchedule, ModelDenoiser
from latentforge.sampling.registry import SAMPLERS, SamplerInfo, resolve, resolve_sampler, sampler_names
from latentforge.sampling.schedules import SCHEDULES, NoiseSchedule, get_sigmas

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "CFGDenoiser",
    "Cond",
    "CondSchedule",
    "ModelDenoiser",
    "NoiseSchedule",
    "SamplerInfo",
    "get_sigmas",
    "resolve",
    "resolve_sampler",
    "sampler_names",
]
