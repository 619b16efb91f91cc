"""How many samplers draw the demo model's prompts correctly at a given CFG scale (issue: every sampler
at its defaults). Three prompts x every registered sampler, 20 steps, judged by the independent colour
and shape analysis of tests/test_demo.py. "default" runs without a CFG scale (the model's default:
Family.default_cfg, or the sampler's own, SamplerInfo.default_cfg).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_samplers.py default,7,4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import latentforge
from latentforge.demo import bundled_model_path
from latentforge.sampling import SAMPLERS
from test_demo import analyse

CASES = [("red", "circle", "blue"), ("green", "triangle", "white"), ("yellow", "square", "red")]


def main() -> None:
    pipe = latentforge.load(bundled_model_path())
    for cfg in (None if c == "default" else float(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "7").split(",")):
        start, correct, weak = time.perf_counter(), 0, []
        scale = {} if cfg is None else {"cfg_scale": cfg}
        for info in SAMPLERS:
            good = 0
            for i, (colour, shape, background) in enumerate(CASES):
                prompt = f"a {colour} {shape} on a {background} background"
                image = pipe.txt2img(prompt, sampler=info.title, seed=10 + i, steps=20, **scale).images[0]
                good += analyse(image) == (colour, shape, background)
            correct += good
            if good < len(CASES):
                weak.append(f"{info.title} {good}/{len(CASES)}")
        total = len(SAMPLERS) * len(CASES)
        label = "default" if cfg is None else f"{cfg:g}"
        seconds = time.perf_counter() - start
        print(f"cfg {label}: {correct}/{total} correct in {seconds:.0f} s; weaker: {', '.join(weak)}")


if __name__ == "__main__":
    main()
