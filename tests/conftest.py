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


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model in float32 (modules may define their own ``demo``, which wins)."""
    import latentforge
    from latentforge.demo import bundled_model_path

    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    return latentforge.load(path, dtype="fp32")


@pytest.fixture
def forced_kernels(monkeypatch, tmp_path_factory):
    """latentforge's native kernels forced on (also on AMX CPUs), built once into a test cache folder, and
    Winograd at every map size (tests of the fast convolution paths)."""
    from latentforge.nn import native

    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))
    monkeypatch.setenv("LATENTFORGE_KERNELS", "on")
    monkeypatch.setenv("LATENTFORGE_WINOGRAD", "on")
    native.reset()
    yield
    native.reset()


@pytest.fixture(scope="module", autouse=True)
def _free_module_temp_dirs(tmp_path_factory):
    """Delete the folders a module's fixtures made with ``tmp_path_factory.mktemp`` once the module is
    done. pytest keeps them to the end of the session otherwise, and with the tests' own folders (freed
    as each test passes: ``tmp_path_retention_policy = "failed"`` in pyproject.toml) a full run wrote
    about 17 GB of model files, more than a small CI disk holds. Shared caches (``kernel-cache``) and
    the folders of failed tests (``test_*``) stay."""
    import re
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        if re.search(r"\d$", path.name) and not path.name.startswith("test_"):
            shutil.rmtree(path, ignore_errors=True)
