import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import os

# Tests compare against fp32 references: pin the automatic dtype choice (the documented override) so
# they do not switch to bf16 on CPUs that have it; test_fastpath.py checks the automatic choice itself.
os.environ.setdefault("LATENTFORGE_DTYPE", "fp32")
# Tiny models run best on one thread (OpenMP threads spin on a busy 2-core machine), and one thread
# makes float summation order, and so exact pixels, the same in every process: the recorded images of
# test_same_pixels.py and the server tests' subprocesses rely on it. `make test-slow` sets more threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    """The CLIP tokenizer (the bundled vocabulary), for the prompt parser's tests."""
    from latentforge.models import CLIPTokenizer

    return CLIPTokenizer()
