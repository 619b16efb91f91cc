"""What the NaN/Inf check of loading costs: loading time with the check and with it switched off.

Models: the tiny SD1 test model (tests/tiny.py), the bundled demo model, and a full-size SD1 UNet with
random fp16 weights (860 M parameters, 1.7 GB; written once to a temporary folder) read into fp32 and
fp16. Each load runs ``repeat`` times alternately with and without the check; the minimum is reported.

    PYTHONPATH=src:tests OMP_NUM_THREADS=1 python benchmarks/finite_check_cost.py [--full]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import latentforge
from latentforge.io import components


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(min seconds with the check, min seconds without it)."""
    real = components._all_finite
    on, off = [], []
    for _ in range(repeat):
        for check, times in ((True, on), (False, off)):
            components._all_finite = real if check else (lambda t: True)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    components._all_finite = real
    return min(on), min(off)


def _full_unet(folder: Path) -> Path:
    from safetensors.torch import save_file

    from latentforge.models.unet import UNet

    cfg = latentforge.get_family("sd1").unet
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    path = folder / "unet.safetensors"
    save_file(state, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also a full-size SD1 UNet (needs ~6 GB of memory)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        from tiny import build_reference, save_folder

        tiny = latentforge.load(save_folder(build_reference("sd1", seed=0), Path(tmp) / "m")).save(
            Path(tmp) / "tiny.safetensors"
        )
        results["tiny sd1, fp32 file -> fp32"] = _timed(lambda: latentforge.load(tiny, dtype="fp32"), args.repeat)
        from latentforge.demo import bundled_model_path

        demo = bundled_model_path()
        if demo is not None:
            results["demo, fp16 file -> fp32"] = _timed(lambda: latentforge.load(demo, dtype="fp32"), args.repeat)
        if args.full:
            from latentforge.io.components import build, identity_refs
            from latentforge.io.tensorfile import open_tensor_file
            from latentforge.models.unet import UNet

            path = _full_unet(Path(tmp))
            cfg = latentforge.get_family("sd1").unet
            for dtype in (torch.float32, torch.float16):

                def load_unet(dtype=dtype):
                    f = open_tensor_file(path)
                    try:
                        build(
                            lambda: UNet(cfg), identity_refs(f, ""), dtype=dtype, device="cpu", what="UNet", source="x"
                        )
                    finally:
                        f.close()

                name = f"full SD1 UNet (860M), fp16 file -> {str(dtype).removeprefix('torch.')}"
                results[name] = _timed(load_unet, max(2, args.repeat // 2))
    for name, (on, off) in results.items():
        print(f"{name:<44} with check {on:7.3f} s   without {off:7.3f} s   cost {100 * (on / off - 1):+5.1f}%")
    print(json.dumps({k: {"with": v[0], "without": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
