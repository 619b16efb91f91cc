"""Freed CPU memory kept for reuse (latentforge/allocator.py): measured by the process's own minor page
faults (getrusage) and resident size (/proc/self/statm), each case in a fresh interpreter so the
process-wide malloc settings of one case cannot leak into another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")

CHILD = """
import json, resource, torch
from latentforge import allocator

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def touch(mb):
    t = torch.empty(mb << 20, dtype=torch.uint8)
    t.fill_(1)  # every page written, as an activation is
    return t

out = {}
"""


def run_child(body: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "LATENTFORGE_MALLOC"} | env
    code = CHILD + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


REUSE = """
out["kept"] = allocator.keep_freed_memory()
for i in range(5):
    before = faults()
    t = touch(64)
    del t
    out[f"faults{i}"] = faults() - before
"""


def test_a_freed_large_block_is_reused_without_page_faults():
    out = run_child(REUSE)
    if not out["kept"]:
        pytest.skip("not glibc")
    # 64 MB = 16384 pages of 4 KiB: the first allocation faults them in; once the heap holds a free block
    # of that size (a second one may be needed: a small object can sit after the first), no new faults
    assert out["faults0"] > 8000
    assert out["faults3"] < 500 and out["faults4"] < 500


def test_system_setting_keeps_glibcs_behaviour():
    out = run_child(REUSE, LATENTFORGE_MALLOC="system")
    assert out["kept"] is False
    assert out["faults3"] > 8000 and out["faults4"] > 8000  # each 64 MB block mapped and faulted anew


def test_release_gives_the_memory_back():
    out = run_child(
        """
        out["kept"] = allocator.keep_freed_memory()
        base = rss()
        t = touch(256)
        del t
        out["kept_mb"] = (rss() - base) / 2**20
        allocator.release()
        out["released_mb"] = (rss() - base) / 2**20
        """
    )
    if not out["kept"]:
        pytest.skip("not glibc")
    assert out["kept_mb"] > 200  # freed, but kept for reuse
    assert out["released_mb"] < 50


def test_bad_setting_says_what_to_use(monkeypatch):
    from latentforge import allocator

    monkeypatch.setenv("LATENTFORGE_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match="'reuse'.*'system'"):
        allocator.wanted()


def test_loading_a_cpu_pipeline_turns_it_on(tmp_path):
    from tiny import tiny_sd1_file

    _, path = tiny_sd1_file(tmp_path, seed=0)
    out = run_child(
        f"""
        import latentforge
        out["before"] = bool(allocator._state.get("kept"))
        latentforge.load({str(path)!r})
        out["after"] = bool(allocator._state.get("kept"))
        out["glibc"] = allocator._glibc() is not None
        """
    )
    assert out["before"] is False
    assert out["after"] is out["glibc"]
