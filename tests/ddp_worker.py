"""Several training runs in one ``torchrun`` launch, for tests/test_train_ddp.py (a launch costs seconds of
start-up per process). Argument: a JSON list of jobs ``{"overrides": [...], "stop_after": n or null}``.

The process group is initialised here once; ``train`` uses the group it finds (train/distributed.py).
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from latentforge.train import load_config, train


def main(argv: list[str]) -> int:
    jobs = json.loads(argv[0])
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            train(load_config(None, job["overrides"]), stop_after=job.get("stop_after"))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
