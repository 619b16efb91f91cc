"""Thread count and OpenMP wait policy (latentforge.threads; issue 16 "no collapse under load").

The wait policy is checked against GNU OpenMP's own report of its settings (``OMP_DISPLAY_ENV=VERBOSE``
prints ``GOMP_SPINCOUNT``: 0 under PASSIVE, 300000 by default), in fresh processes started the ways
users start latentforge.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentforge import threads

SRC = Path(__file__).resolve().parents[1] / "src"


def _omp_report(code: list[str], policy: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(SRC))
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    proc = subprocess.run([sys.executable, *code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = dict(re.findall(r"^\s+(\w+) = '([^']*)'", proc.stderr, re.M))
    if "GOMP_SPINCOUNT" not in report:
        pytest.skip("torch's OpenMP runtime is not GNU OpenMP (no OMP_DISPLAY_ENV report to check)")
    return report


ENTRY_POINTS = {
    "python -m latentforge": ["-m", "latentforge", "--help"],
    "console script (latentforge.cli:main)": ["-c", "from latentforge.cli import main; main(['--help'])"],
    "server app import (uvicorn workers)": ["-c", "import latentforge.server.jobs"],
    "Python API (import latentforge first)": ["-c", "import latentforge, torch; torch.ones(2) + 1"],
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_entry_points_make_openmp_threads_sleep(name):
    report = _omp_report(ENTRY_POINTS[name])
    assert report["GOMP_SPINCOUNT"] == "0", report
    assert report["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_users_policy_is_kept():
    report = _omp_report(ENTRY_POINTS["python -m latentforge"], policy="ACTIVE")
    assert report["OMP_WAIT_POLICY"] == "ACTIVE"
    assert report["GOMP_SPINCOUNT"] != "0"


def test_torch_imported_first_cannot_be_changed():
    # documented limit: torch loaded OpenMP before latentforge ran; the default spin count stays
    report = _omp_report(["-c", "import torch, latentforge; torch.ones(2) + 1"])
    assert report["GOMP_SPINCOUNT"] != "0"


def test_the_threads_module_does_not_import_torch():
    # it runs before torch in latentforge/__init__: importing it must not load torch itself
    # (latentforge/__init__ imports torch after the wait policy is set: load the file alone)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', "
        f"{str(SRC / 'latentforge' / 'threads.py')!r}); m = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(m); print('torch' in sys.modules, m.prefer_passive_waiting())"
    )
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr


@pytest.fixture
def no_fixed_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    threads.fix_threads(None)
    yield monkeypatch
    threads.fix_threads(None)
    threads.reserve_cores(0)


def test_a_fixed_count_wins(no_fixed_threads):
    no_fixed_threads.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(1e15)[0] == 3
    assert threads.choose_threads(1.0)[0] == 3  # even for tiny work
    no_fixed_threads.setenv(threads.THREADS_ENV, "5")
    assert threads.choose_threads(1.0)[0] == 5
    threads.fix_threads(2)
    assert threads.choose_threads(1.0)[0] == 2


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", threads.THREADS_ENV])
@pytest.mark.parametrize("value", ["many", "0", "-2"])
def test_bad_counts_name_the_variable(no_fixed_threads, var, value):
    no_fixed_threads.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        threads.choose_threads(1e15)
    with pytest.raises(ValueError, match="threads"):
        threads.fix_threads(0)


def test_default_is_every_usable_core_but_one_for_tiny_work(no_fixed_threads):
    assert threads.choose_threads(threads.TINY_WORK)[0] == threads.usable_cores()
    assert threads.choose_threads(1e15)[0] == threads.usable_cores()
    # the demo model (2.5e6 parameters) at 64 px: 8 x 8 latent pixels
    assert threads.choose_threads(2.5e6 * 8 * 8)[0] == 1


def test_free_mode_runs_small_work_on_one_thread(no_fixed_threads):
    no_fixed_threads.setenv(threads.THREADS_ENV, "free")
    # the demo model at 512 px: 2.5e6 parameters x 64 x 64 latent pixels
    assert threads.choose_threads(2.5e6 * 64 * 64)[0] == 1
    no_fixed_threads.setattr(threads, "usable_cores", lambda: 8)
    no_fixed_threads.setattr(threads, "free_cores", lambda sample_s=0: 2.6)  # others use 5.4 cores
    assert threads.choose_threads(1e15)[0] == 3


def _fake_stat(monkeypatch, busy_per_cpu: list[int], own_ticks: float, cpus: set[int]):
    """/proc/stat that advances by 100 ticks per CPU with ``busy`` of them busy; ``own_ticks`` of
    them are this process's."""
    calls = {"n": 0}

    def ticks(c):
        k = calls["n"]
        calls["n"] += 1
        return (sum(busy_per_cpu) * k, 100 * len(busy_per_cpu) * k)

    monkeypatch.setattr(threads, "_cpu_ticks", ticks)
    own = iter([0.0, own_ticks])
    monkeypatch.setattr(threads, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(threads, "usable_cores", lambda: len(busy_per_cpu))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)


def test_free_cores_counts_other_processes_only(monkeypatch):
    # 4 CPUs; in the sample 3 of them were busy 100% and 1 idle; 100 of the busy ticks were ours:
    # others used 2 CPUs -> 2 free
    _fake_stat(monkeypatch, [100, 100, 100, 0], own_ticks=100, cpus={0, 1, 2, 3})
    assert threads.free_cores(sample_s=0) == pytest.approx(2.0)


def test_free_cores_never_below_one(monkeypatch):
    _fake_stat(monkeypatch, [100, 100], own_ticks=0, cpus={0, 1})
    assert threads.free_cores(sample_s=0) == 1.0


def test_the_server_keeps_a_core_where_there_are_enough(no_fixed_threads):
    no_fixed_threads.setattr(threads, "usable_cores", lambda: 8)
    no_fixed_threads.setattr(threads, "free_cores", lambda sample_s=0: 8.0)
    assert threads.choose_threads(1e15)[0] == 8
    threads.reserve_cores(1)
    assert threads.choose_threads(1e15)[0] == 7
    no_fixed_threads.setattr(threads, "usable_cores", lambda: 2)
    no_fixed_threads.setattr(threads, "free_cores", lambda sample_s=0: 2.0)
    assert threads.choose_threads(1e15)[0] == 2  # a 2-core machine: the generation takes both


def test_real_machine_figures_are_sane():
    n = threads.usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert 1.0 <= threads.free_cores(sample_s=0.05) <= n


def test_generation_runs_with_the_chosen_count_and_restores_it(no_fixed_threads):
    import latentforge
    from latentforge.demo import bundled_model_path

    path = bundled_model_path()
    if path is None:
        pytest.skip("no bundled demo model")
    pipe = latentforge.load(path)
    seen = []
    before = torch.get_num_threads()
    pipe.txt2img(
        "a red circle", steps=2, seed=1, width=64, height=64, progress=lambda p: seen.append(torch.get_num_threads())
    )
    assert seen == [1] * 2  # tiny work: one thread
    assert torch.get_num_threads() == before
    threads.fix_threads(1 if threads.usable_cores() > 1 else 2)
    seen.clear()
    pipe.txt2img(
        "a red circle", steps=1, seed=1, width=64, height=64, progress=lambda p: seen.append(torch.get_num_threads())
    )
    assert seen == [1 if threads.usable_cores() > 1 else 2]


def test_cli_threads_flag(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        [sys.executable, "-m", "latentforge", "--threads", "0", "samplers"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--threads" in proc.stderr
