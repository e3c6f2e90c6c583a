"""How many threads torch may use for the chunk math of a merge.

Measured on a 2-core machine with other work running (load 8-9): `ties` on a Llama-shaped set took 40 s with one
intra-op thread and 118 s with torch's default of two (`linear`: 2.6 s against 5.3 s). An intra-op parallel region
waits at a barrier for its slowest thread, so one thread descheduled by other work (or by our own writer thread,
which copies every output chunk into the page cache) stalls the whole operation. The merge therefore takes the
cores it can count on: those it may run on (affinity and cgroup quota), minus what other processes kept busy over
the last minute (the load average, but no more than what is runnable now), minus one for the writer thread where
the method's math is as light as that copy (element-wise methods), at least one and at most `MAX_THREADS`. The
other methods spend several times longer on a chunk's math than the writer on its copy, so they gain from every
core (on that machine, quiet, merge time with two threads against one: `ties` and `sce` 10-20% less; `linear`
unchanged). `OMP_NUM_THREADS` set by the user wins. Results do not depend on the choice: whole-tensor sums are
fixed pairwise trees and every other statistic is an exact count.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

MAX_THREADS = 8  # element-wise chunk math is bound by memory bandwidth well before this


def _cgroup_cpu_limit() -> float | None:
    """CPUs this process's cgroup may use per period (v2 cpu.max or v1 cfs quota), or None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            text = _read(Path("/sys/fs/cgroup") / rel.lstrip("/") / "cpu.max")
            if text and not text.startswith("max"):
                quota, period = text.split()[:2]
                limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):
            d = Path("/sys/fs/cgroup/cpu") / rel.lstrip("/")
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, math.floor(limit) if limit else cores))


def others_busy() -> float:
    """Cores other processes keep busy: the load average of the last minute, less this process, and no more than
    the tasks runnable right now besides this thread. The average lags: merges run one after another (a sweep, a
    benchmark) would each count the previous one for up to a minute."""
    if not hasattr(os, "getloadavg"):
        return 0.0
    average = os.getloadavg()[0] - 1
    text = _read(Path("/proc/loadavg"))  # "0.52 0.58 0.59 2/467 12345": runnable/total is the fourth field
    try:
        runnable = int(text.split()[3].split("/")[0]) - 1
    except (AttributeError, IndexError, ValueError):
        return average
    return min(average, runnable)


def merge_threads(cores: int, others_load: float, writer_core: bool = True) -> int:
    """Intra-op threads for a merge on `cores` usable cores while other processes keep `others_load` busy;
    `writer_core`: leave a core to the writer thread."""
    free = math.floor(cores - max(0.0, others_load))
    return max(1, min(cores - 1 if writer_core else cores, free, MAX_THREADS))


_own_threads: int | None = None  # the merge's own threads, while torch is held to one (`merge_thread_policy`)


def pool_threads() -> int:
    """How many threads a merge's own parallel work (`streaming.in_parallel`) may use: as many as its merge's
    policy chose, else torch's intra-op count."""
    return _own_threads or torch.get_num_threads()


@contextlib.contextmanager
def merge_thread_policy(writer_core: bool = True, own_threads: bool = False):
    """Run the block with `merge_threads` threads (unless OMP_NUM_THREADS says), then restore: torch's intra-op
    threads, or, with `own_threads` (a method whose math runs on the merge's own threads), `pool_threads` with torch
    held to one: after each parallel region torch's OpenMP threads spin a while, waiting for the next, on the cores
    the merge's own threads need (measured: 2.3 s of CPU spun in a 10 s DELLA merge at 256 MiB)."""
    global _own_threads
    previous = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        yield previous
        return
    threads = merge_threads(usable_cores(), others_busy(), writer_core)
    torch.set_num_threads(1 if own_threads else threads)
    _own_threads = threads if own_threads else None
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
        _own_threads = None
