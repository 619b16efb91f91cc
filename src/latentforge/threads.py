"""How many CPU threads a generation uses, and how idle OpenMP threads wait.

PyTorch's CPU kernels run on an OpenMP thread pool. By default GNU OpenMP threads *spin* after each
parallel region, waiting for the next one; on a machine where another process wants the same cores,
the spinning threads and the other process take turns and a step slows down many times over (issue 16
measured a 64 px demo image at 61 s instead of 0.7 s). ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep
instead; OpenMP reads it once, when the runtime loads, that is when ``torch`` is first imported.
``prefer_passive_waiting`` (called by ``import latentforge`` before it imports torch) puts it in the
environment unless the user set it; importing latentforge after torch cannot change it.

``auto_threads`` sets the thread count per generation. By default that is every core this process may
use (its affinity mask, capped by a cgroup CPU quota), less one the server keeps for HTTP on machines
with 3 or more. Measured on a 2-core machine under a load average of 10 (other processes): with
PASSIVE waiting, two threads made the demo image at 64 px in 0.28 s against 1.12 s on one thread, and
at 256 px 4.3 s against 12.3 s (sleeping threads get the CPU back quickly when they wake), so neither
small models nor other processes' load are reasons for fewer threads. ``LATENTFORGE_THREADS=free``
asks for the polite choice on a shared machine instead: one thread for small work (UNet parameters x
latent pixels x batch below ``SMALL_WORK``: the demo and test models), else the cores free right now
(a 0.1 s sample of ``/proc/stat``, less this process's own time). A fixed count wins over both:
``OMP_NUM_THREADS``, ``LATENTFORGE_THREADS=N`` or ``fix_threads`` (the CLI's ``--threads``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
THREADS_ENV = "LATENTFORGE_THREADS"
# LATENTFORGE_THREADS=free: UNet parameters x latent pixels x batch below which one thread is used (on an
# idle machine the demo model, 2.5M parameters, was no faster on two threads than on one up to 256 px)
SMALL_WORK = 2e10
# below this every generation runs on one thread: quiet 2-core run of bench_load.py, the demo image at
# 64 px (work 1.6e8) took 0.51 s on one PASSIVE thread and 1.47 s on two (spinning: 0.47 s); at 256 px
# (2.6e9) two threads were 3x faster than one on a loaded machine
TINY_WORK = 5e8
SAMPLE_S = 0.1

_fixed: int | None = None
_reserved = 0


def prefer_passive_waiting() -> bool:
    """Put ``OMP_WAIT_POLICY=PASSIVE`` in the environment unless the user set a policy. True when
    OpenMP will see PASSIVE: torch is not imported yet and the policy is (now) PASSIVE."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return "torch" not in sys.modules and os.environ[WAIT_POLICY].upper() == "PASSIVE"


def fix_threads(n: int | None) -> None:
    """Use exactly ``n`` threads for every generation of this process (None: choose again each time)."""
    global _fixed
    if n is not None and n < 1:
        raise ValueError(f"threads: {n} is not a thread count; give 1 or more")
    _fixed = n


def reserve_cores(n: int) -> None:
    """Keep ``n`` cores free for other work of this process (the server's HTTP side) when there are
    at least ``n + 2`` usable cores; on smaller machines the generation takes them all."""
    global _reserved
    _reserved = max(0, int(n))


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None where it cannot be read."""
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        total += sum(v[:8])
        busy += sum(v[:8]) - idle
    return (busy, total) if total else None


def _own_ticks() -> float:
    """This process's CPU time in jiffies (USER_HZ)."""
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def free_cores(sample_s: float = SAMPLE_S) -> float:
    """Cores free for this process now: usable cores less what other processes used on them during a
    ``sample_s`` look at /proc/stat (falls back to the 1-minute load average where there is none)."""
    n = usable_cores()
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    first, own = _cpu_ticks(cpus), _own_ticks()
    if first is None:
        try:
            return max(1.0, n - os.getloadavg()[0])
        except OSError:
            return float(n)
    time.sleep(sample_s)
    second = _cpu_ticks(cpus)
    if second is None or second[1] <= first[1]:
        return float(n)
    others = max(0.0, (second[0] - first[0]) - (_own_ticks() - own))
    busy_cores = others / (second[1] - first[1]) * len(cpus)
    return max(1.0, min(float(n), n - busy_cores))


def fixed_threads() -> tuple[int, str] | None:
    """(count, where from) when the user fixed the thread count, else None."""
    if _fixed is not None:
        return _fixed, "--threads/fix_threads"
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(var, "").strip()
        if text and text.lower() not in ("auto", "free"):
            try:
                n = int(text.split(",")[0])
            except ValueError:
                raise ValueError(f"{var}={text!r} is not a thread count; give a whole number or unset it") from None
            if n < 1:
                raise ValueError(f"{var}={text!r}: give 1 or more threads, or unset it")
            return n, var
    return None


def choose_threads(work: float, sample_s: float = SAMPLE_S) -> tuple[int, str]:
    """(threads, why) for a generation of ``work`` = UNet parameters x latent pixels x batch."""
    fixed = fixed_threads()
    if fixed is not None:
        return fixed[0], f"fixed by {fixed[1]}"
    n = usable_cores()
    keep = _reserved if n >= _reserved + 2 else 0
    kept = f", {keep} kept for the server" if keep else ""
    if work < TINY_WORK:
        return 1, "tiny model/image"
    if os.environ.get(THREADS_ENV, "").strip().lower() != "free":
        return n - keep, f"{n} usable cores{kept}"
    if work < SMALL_WORK:
        return 1, "small model/image (LATENTFORGE_THREADS=free)"
    free = free_cores(sample_s)
    threads = max(1, min(n - keep, int(free + 0.5) - keep))
    return threads, f"{free:.1f} of {n} cores free{kept} (LATENTFORGE_THREADS=free)"


@contextlib.contextmanager
def auto_threads(work: float, device_type: str = "cpu") -> Iterator[int]:
    """Run the body with ``choose_threads(work)`` torch threads (CPU only), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if device_type != "cpu":
        yield before
        return
    n, _ = choose_threads(work)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
