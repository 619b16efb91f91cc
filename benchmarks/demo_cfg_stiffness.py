"""Why multistep samplers fail on the demo model at CFG 7 (docs/demo-model.md): the Jacobian of the
conditional, unconditional and guided denoisers in the directions of the four latent channels' means,
along an Euler trajectory of 20 steps, by finite differences; and h * lambda = -(1 - J) * step / sigma
of the guided denoiser's most negative eigenvalue, to compare with the stability limits of the methods
on the negative real axis (Euler -2, 2nd-order Adams-Bashforth -1, 3rd -0.55, 4th -0.3).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_cfg_stiffness.py 7
"""

from __future__ import annotations

import sys

import torch

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.pipelines.generate import build_plan
from latentforge.pipelines.request import GenerationRequest


def channel_mean_jacobian(model, x, sigma, cond) -> torch.Tensor:
    """(C, C): how the spatial mean of each output channel moves with the mean of each input channel."""
    channels = x.shape[1]
    base = model(x, sigma, cond)
    out = torch.zeros(channels, channels)
    step = 0.05 * float(sigma)
    for k in range(channels):
        moved = x.clone()
        moved[:, k] += step
        out[:, k] = ((model(moved, sigma, cond) - base) / step).mean(dim=(0, 2, 3))
    return out


def main() -> None:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 7.0
    pipe = latentforge.load(bundled_model_path())
    req = GenerationRequest(prompt="a red circle on a blue background", sampler="Euler", cfg_scale=scale, steps=20)
    with torch.inference_mode():
        p = build_plan(pipe, req, None).passes[0]
        cond, uncond = p.cond.at(0), p.uncond.at(0)
        sigmas = p.sigmas
        x = torch.randn((1, *p.shape), generator=torch.Generator().manual_seed(10)) * float(sigmas[0])
        for i in range(len(sigmas) - 2):
            sigma = sigmas[i : i + 1].float()
            jc = channel_mean_jacobian(p.model, x, sigma, cond)
            ju = channel_mean_jacobian(p.model, x, sigma, uncond)
            jg = ju + scale * (jc - ju)
            lowest = float(torch.linalg.eigvals(jg).real.min())
            ratio = float((sigmas[i] - sigmas[i + 1]) / sigmas[i])
            print(
                f"sigma {float(sigma):6.3f}: max eig cond {float(torch.linalg.eigvals(jc).real.max()):5.2f}, "
                f"uncond {float(torch.linalg.eigvals(ju).real.max()):5.2f}; guided min {lowest:5.2f}, "
                f"h*lambda {-(1 - lowest) * ratio:5.2f}"
            )
            d = p.model(x, sigma, uncond)
            d = d + scale * (p.model(x, sigma, cond) - d)
            x = x + (x - d) / float(sigma) * float(sigmas[i + 1] - sigmas[i])


if __name__ == "__main__":
    main()
