"""Sampler names: A1111's (also legacy ones with the schedule in the name), ComfyUI's, and ours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from latentforge.sampling import cfgpp
from latentforge.sampling import dpm_adaptive as da
from latentforge.sampling import dpmsolver as dpm
from latentforge.sampling import multistep as ms
from latentforge.sampling import samplers as s
from latentforge.sampling.schedules import SCHEDULES, schedule_name


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # ours = ComfyUI's where it has one
    title: str  # A1111's (Forge's for samplers A1111 lacks, where it has one)
    fn: Callable
    schedule: str = "normal"  # what A1111's "Automatic" picks for it
    aliases: tuple[str, ...] = ()
    stochastic: bool = False  # draws noise while sampling (ancestral / SDE / restart)
    brownian: bool = False  # A1111 and ComfyUI drive its noise with a Brownian tree
    discard_penultimate_sigma: bool = False  # A1111 drops the next-to-last sigma for these
    # A1111's "second_order": prompt schedules are laid over twice the steps in model calls (Heun, DPM2,
    # DPM2 a, DPM++ SDE, DPM++ 2S a, Restart; Forge leaves it off for HeunPP2)
    second_order: bool = False
    evaluations: Callable[[int], int] = lambda steps: steps  # model calls for a schedule of `steps` (approx.)
    # the CFG scale a request without one gets when the scale means something else for this sampler (A1111's
    # DDIM CFG++: 12.5 x CFG++'s lambda, so A1111's 7); None: the model family's default_cfg
    default_cfg: float | None = None


def _twice(steps: int) -> int:
    return 2 * steps - 1


SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("euler", "Euler", s.sample_euler, aliases=("k_euler",)),
    SamplerInfo(
        "euler_ancestral",
        "Euler a",
        s.sample_euler_ancestral,
        aliases=("k_euler_a", "k_euler_ancestral"),
        stochastic=True,
    ),
    SamplerInfo("heun", "Heun", s.sample_heun, aliases=("k_heun",), second_order=True, evaluations=_twice),
    SamplerInfo(
        "dpm_2",
        "DPM2",
        s.sample_dpm_2,
        "karras",
        aliases=("k_dpm_2",),
        discard_penultimate_sigma=True,
        second_order=True,
        evaluations=_twice,
    ),
    SamplerInfo(
        "dpm_2_ancestral",
        "DPM2 a",
        s.sample_dpm_2_ancestral,
        "karras",
        aliases=("k_dpm_2_a",),
        stochastic=True,
        discard_penultimate_sigma=True,
        second_order=True,
        evaluations=_twice,
    ),
    SamplerInfo("lms", "LMS", s.sample_lms, aliases=("k_lms",)),
    # A1111 runs DPM fast / adaptive with its "eta for ancestral samplers" (1 by default); ComfyUI with 0
    SamplerInfo("dpm_fast", "DPM fast", partial(da.sample_dpm_fast, eta=1.0), aliases=("k_dpm_fast",), stochastic=True),
    SamplerInfo(
        "dpm_adaptive",
        "DPM adaptive",
        partial(da.sample_dpm_adaptive, eta=1.0),
        aliases=("k_dpm_ad", "k_dpm_adaptive"),
        stochastic=True,
    ),
    SamplerInfo("dpmpp_2m", "DPM++ 2M", dpm.sample_dpmpp_2m, "karras", aliases=("k_dpmpp_2m",)),
    SamplerInfo(
        "dpmpp_2m_sde",
        "DPM++ 2M SDE",
        dpm.sample_dpmpp_2m_sde,
        "exponential",
        aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
        stochastic=True,
        brownian=True,
    ),
    SamplerInfo(
        "dpmpp_2m_sde_heun",
        "DPM++ 2M SDE Heun",
        partial(dpm.sample_dpmpp_2m_sde, solver_type="heun"),
        "exponential",
        aliases=("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
        stochastic=True,
        brownian=True,
    ),
    SamplerInfo(
        "dpmpp_sde",
        "DPM++ SDE",
        dpm.sample_dpmpp_sde,
        "karras",
        aliases=("k_dpmpp_sde", "dpmpp_sde_gpu"),
        stochastic=True,
        brownian=True,
        second_order=True,
        evaluations=_twice,
    ),
    SamplerInfo(
        "dpmpp_2s_ancestral",
        "DPM++ 2S a",
        dpm.sample_dpmpp_2s_ancestral,
        "karras",
        aliases=("k_dpmpp_2s_a",),
        stochastic=True,
        second_order=True,
        evaluations=_twice,
    ),
    SamplerInfo(
        "dpmpp_3m_sde",
        "DPM++ 3M SDE",
        dpm.sample_dpmpp_3m_sde,
        "exponential",
        aliases=("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"),
        stochastic=True,
        brownian=True,
        discard_penultimate_sigma=True,
    ),
    SamplerInfo(
        "restart", "Restart", s.sample_restart, "karras", stochastic=True, second_order=True, evaluations=_twice
    ),
    SamplerInfo("ddim", "DDIM", s.sample_ddim, "ddim_uniform"),
    SamplerInfo("ddim_cfg_pp", "DDIM CFG++", cfgpp.sample_ddim_cfg_pp, "ddim_uniform", default_cfg=7.0),
    SamplerInfo("plms", "PLMS", s.sample_plms, "ddim_uniform", evaluations=lambda n: n + 1),
    # A1111's UniPC: variant bh1, order 3 (its defaults; ComfyUI's uni_pc is the same). Both step to sigma 0
    # over the schedule's sigmas; A1111's own UniPC uses its time-uniform timesteps under "Automatic".
    SamplerInfo("uni_pc", "UniPC", partial(dpm.sample_unipc, order=3, variant="bh1"), "normal", aliases=("unipc",)),
    SamplerInfo("uni_pc_bh2", "UniPC bh2", partial(dpm.sample_unipc, order=3, variant="bh2"), "normal"),
    SamplerInfo("lcm", "LCM", s.sample_lcm, "lcm", stochastic=True),
    SamplerInfo("ddpm", "DDPM", s.sample_ddpm, "ddim_uniform", stochastic=True),
    # ComfyUI's further samplers (titles as Forge names them where it has them)
    SamplerInfo("euler_cfg_pp", "Euler CFG++", cfgpp.sample_euler_cfg_pp),
    SamplerInfo("euler_ancestral_cfg_pp", "Euler a CFG++", cfgpp.sample_euler_ancestral_cfg_pp, stochastic=True),
    SamplerInfo("dpmpp_2m_cfg_pp", "DPM++ 2M CFG++", cfgpp.sample_dpmpp_2m_cfg_pp),
    SamplerInfo("heunpp2", "HeunPP2", s.sample_heunpp2, evaluations=lambda n: max(3 * n - 3, 1)),
    SamplerInfo("ipndm", "IPNDM", ms.sample_ipndm),
    SamplerInfo("deis", "DEIS", ms.sample_deis),
    SamplerInfo("res_multistep", "RES multistep", ms.sample_res_multistep),
    SamplerInfo(
        "res_multistep_ancestral",
        "RES multistep a",
        partial(ms.sample_res_multistep, eta=1.0),
        stochastic=True,
    ),
    SamplerInfo("res_multistep_cfg_pp", "RES multistep CFG++", partial(ms.sample_res_multistep, cfg_pp=True)),
    SamplerInfo(
        "res_multistep_ancestral_cfg_pp",
        "RES multistep a CFG++",
        partial(ms.sample_res_multistep, eta=1.0, cfg_pp=True),
        stochastic=True,
    ),
    SamplerInfo("er_sde", "ER SDE", ms.sample_er_sde, stochastic=True),
)

_SUFFIX_SCHEDULES = {"karras": "karras", "exponential": "exponential", "ka": "karras"}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("+", "p")


_BY_KEY: dict[str, SamplerInfo] = {}
for _info in SAMPLERS:
    for _n in (_info.name, _info.title, *_info.aliases):
        _BY_KEY[_key(_n)] = _info


def sampler_names() -> list[str]:
    return [info.title for info in SAMPLERS]


def resolve_sampler(name: str) -> tuple[SamplerInfo, str | None]:
    """(sampler, schedule named inside the sampler name or None). Accepts "DPM++ 2M Karras",
    "dpmpp_2m", "k_dpmpp_2m_ka", "Euler a", ...; an unknown name raises with the valid ones listed."""
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key], None
    for suffix, schedule in _SUFFIX_SCHEDULES.items():
        base = key.removesuffix(" " + suffix)
        if base != key and base in _BY_KEY:
            return _BY_KEY[base], schedule
    raise ValueError(
        f"unknown sampler {name!r}. Valid samplers: {', '.join(sampler_names())} (also ComfyUI names such as "
        f"'dpmpp_2m', and A1111 names with a schedule such as 'DPM++ 2M Karras')"
    )


def resolve(sampler: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """The sampler and the schedule to use: an explicit schedule wins, then one named in the sampler
    name, then the sampler's own default (A1111's "Automatic")."""
    info, from_name = resolve_sampler(sampler)
    chosen = schedule_name(schedule) if schedule else "automatic"
    if chosen == "automatic":
        chosen = from_name or info.schedule
    assert chosen in SCHEDULES
    return info, chosen
