"""How many CPU threads each rank of a torch-engine pod runs: the pod's CPU budget shared by its ranks.

torch starts one OpenMP thread per CPU it may run on, which in a container is every CPU of the node:
its CPU limit (a CFS quota) is not a CPU set. A pod limited to 4 CPUs on a 64-core node would run 64
threads per rank; they are throttled to 4 CPUs' time, and every parallel region ends in a barrier where
the threads that finished spin while the others wait for CPU time (decode collapsed tenfold on a 2-core
machine with a second busy process). So each rank takes the budget — the CPUs it may run on, less where
the cgroup's quota allows fewer (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), rounded up — divided
by the ranks in the pod, at least one. An explicit OMP_NUM_THREADS is the operator's or the user's
choice and is kept.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Final

import torch

log = logging.getLogger(__name__)

CGROUP: Final = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_cpus(root: Path = CGROUP) -> float | None:
    """CPUs' worth of time the cgroup's quota allows; None where there is no quota (or no cgroup)."""
    if (v2 := _read(root / "cpu.max")) is not None:
        quota, _, period = v2.partition(" ")
        if quota == "max" or not period:
            return None
        return int(quota) / int(period) if int(period) > 0 else None
    quota_v1, period_v1 = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_v1 is None or period_v1 is None or int(quota_v1) <= 0 or int(period_v1) <= 0:
        return None
    return int(quota_v1) / int(period_v1)


def cpu_budget(root: Path = CGROUP) -> int:
    """Whole CPUs this process may use: its CPU set, less where the quota allows fewer (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota = quota_cpus(root)
    except ValueError:  # a cgroup file not as the kernel writes it: trust the CPU set
        quota = None
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def threads_per_rank(ranks_here: int, *, root: Path = CGROUP) -> int | None:
    """The thread count for each of this pod's `ranks_here` ranks; None where OMP_NUM_THREADS decides."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpu_budget(root) // max(1, ranks_here))


def set_rank_threads(ranks_here: int) -> int:
    """Set torch's threads for one rank of this pod (threads_per_rank); returns the count in use."""
    if (n := threads_per_rank(ranks_here)) is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("%d CPU threads for each of this pod's %d ranks (its CPU budget shared)", n, ranks_here)
    return torch.get_num_threads()
