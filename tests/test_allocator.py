"""Freed CPU memory reused during a sampler's steps and, on request, while the VAE runs
(latentforge/allocator.py): measured by the process's own minor page faults (getrusage) and resident size
(/proc/self/statm), each case in a fresh interpreter so the process-wide malloc settings of one case
cannot leak into another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

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

def rounds(n, mb=64):
    counts = []
    for _ in range(n):
        before = faults()
        t = touch(mb)
        del t
        counts.append(faults() - before)
    return counts

out = {"glibc": allocator._glibc() is not None}
"""


def run_child(body: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "LATENTFORGE_MALLOC"} | env
    code = CHILD + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["glibc"]:
        pytest.skip("not glibc")
    return out


# 64 MB = 16384 pages of 4 KiB
REUSE = """
with allocator.reusing() as on:
    out["on"] = on
    out["inside"] = rounds(5)
"""


def test_freed_large_blocks_are_reused_inside_when_asked():
    out = run_child(REUSE, LATENTFORGE_MALLOC="reuse")
    assert out["on"] is True
    # the first allocations fault their pages in (a second block may be needed: a small object can sit
    # after the first); then the heap's free blocks serve them with no new faults
    assert out["inside"][0] > 8000
    assert max(out["inside"][3:]) < 500


@pytest.mark.parametrize("setting", [{}, {"LATENTFORGE_MALLOC": "system"}, {"LATENTFORGE_MALLOC": "steps"}])
def test_the_vae_keeps_glibcs_behaviour_unless_asked(setting):
    out = run_child(REUSE, **setting)
    assert out["on"] is False
    assert min(out["inside"][1:]) > 8000  # each 64 MB block mapped and faulted anew


STEPS = """
base = rss()
with allocator.reusing("steps") as on:
    out["on"] = on
    out["inside"] = rounds(5)
    out["inside_mb"] = (rss() - base) / 2**20
out["after_mb"] = (rss() - base) / 2**20
out["active_after"] = allocator.active()
"""


@pytest.mark.parametrize("setting", [{}, {"LATENTFORGE_MALLOC": "steps"}, {"LATENTFORGE_MALLOC": "reuse"}])
def test_a_samplers_steps_reuse_freed_blocks_by_default(setting):
    out = run_child(STEPS, **setting)
    assert out["on"] is True
    assert max(out["inside"][3:]) < 500
    assert out["inside_mb"] > 60  # the freed 64 MB block kept for the next step
    assert out["after_mb"] < 50 and not out["active_after"]  # handed back when the sampler ends


def test_system_setting_leaves_the_steps_to_glibc_too():
    out = run_child(STEPS, LATENTFORGE_MALLOC="system")
    assert out["on"] is False
    assert min(out["inside"][1:]) > 8000


def test_leaving_gives_the_memory_back_and_nesting_holds_it_until_the_outer_exit():
    out = run_child(
        """
        base = rss()
        with allocator.reusing():
            with allocator.reusing():
                t = touch(256)
                del t
            out["after_inner_mb"] = (rss() - base) / 2**20
            out["inner_left_on"] = allocator.active()
            out["reuse_after_inner"] = rounds(3, 256)[-1]
        out["after_outer_mb"] = (rss() - base) / 2**20
        out["on_after"] = allocator.active()
        """,
        LATENTFORGE_MALLOC="reuse",
    )
    assert out["after_inner_mb"] > 200 and out["inner_left_on"]  # still kept for the outer context
    assert out["reuse_after_inner"] < 2000  # the kept 256 MB block served the next one
    assert out["after_outer_mb"] < 50 and not out["on_after"]  # malloc_trim handed it back


def test_release_returns_free_heap_memory():
    out = run_child(
        """
        base = rss()
        ts = [torch.ones(64 << 10, dtype=torch.uint8) for _ in range(3000)]  # 64 KB blocks: from the heap
        keep = torch.ones(64 << 10, dtype=torch.uint8)  # one after them: freeing them cannot shrink the top
        del ts
        out["freed_mb"] = (rss() - base) / 2**20
        out["released"] = allocator.release()
        out["released_mb"] = (rss() - base) / 2**20
        """
    )
    assert out["released"] is True
    assert out["freed_mb"] - out["released_mb"] > 100


def test_bad_setting_says_what_to_use(monkeypatch):
    from latentforge import allocator

    monkeypatch.setenv("LATENTFORGE_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match=r"'steps'.*'reuse'.*'system'"):
        allocator.wanted()


def test_the_vae_runs_inside_it(monkeypatch):
    from latentforge import allocator
    from latentforge.families import get_family
    from latentforge.models import AutoencoderKL
    from latentforge.models import vae as vae_module

    seen = []
    real = allocator.reusing

    def spy():
        seen.append(True)
        return real()

    monkeypatch.setattr(vae_module.allocator, "reusing", spy)
    cfg = get_family("sd1").vae
    small = type(cfg)(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    vae = AutoencoderKL(small).eval()
    with torch.inference_mode():
        z = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
        vae.decode(z)
    assert len(seen) == 2


def test_mapped_empty_is_a_private_page_aligned_tensor_of_its_own():
    out = run_child(
        """
        import gc
        def shmem():
            for line in open("/proc/self/status"):
                if line.startswith("RssShmem"):
                    return int(line.split()[1]) * 1024
        t = allocator.mapped_empty((3, 5, 7), torch.bfloat16)
        out["shape"], out["dtype"] = list(t.shape), str(t.dtype)
        out["contiguous"], out["aligned"] = t.is_contiguous(), t.data_ptr() % 4096 == 0
        view = t[1]
        del t
        gc.collect()
        view.fill_(2.0)  # a view keeps the mapping alive
        out["view_sum"] = float(view.float().sum())
        out["empty"] = list(allocator.mapped_empty((0, 4), torch.float32).shape)
        before = shmem()
        big = allocator.mapped_empty((64 << 20,), torch.uint8)
        big.fill_(1)
        out["shmem_growth_mb"] = (shmem() - before) / 2**20
        out["rss_growth_ok"] = int(big.sum()) == 64 << 20
        """
    )
    assert out["shape"] == [3, 5, 7] and out["dtype"] == "torch.bfloat16"
    assert out["contiguous"] and out["aligned"]
    assert out["view_sum"] == 2.0 * 5 * 7
    assert out["empty"] == [0, 4]
    assert out["shmem_growth_mb"] < 1 and out["rss_growth_ok"]  # private memory, not shared (slower faults)


def test_generation_samples_inside_steps_reuse_and_decodes_outside_it(demo, monkeypatch):
    """The sampler's steps run with freed blocks reused (by default); the VAE's decode after them does not:
    the steps' heap is handed back before the generation's other memory peak."""
    from latentforge import allocator

    monkeypatch.delenv("LATENTFORGE_MALLOC", raising=False)
    during_steps, during_decode = [], []
    real_decode = demo.vae.decode

    def decode(*args, **kwargs):
        during_decode.append(allocator.active())
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(demo.vae, "decode", decode)
    demo.txt2img("a red circle", steps=3, seed=1, progress=lambda p: during_steps.append(allocator.active()))
    if allocator._glibc() is None:
        pytest.skip("not glibc")
    assert during_steps and all(during_steps)
    assert during_decode and not any(during_decode)
    assert not allocator.active()
    monkeypatch.setenv("LATENTFORGE_MALLOC", "system")
    during_steps.clear()
    demo.txt2img("a red circle", steps=2, seed=1, progress=lambda p: during_steps.append(allocator.active()))
    assert during_steps and not any(during_steps)
