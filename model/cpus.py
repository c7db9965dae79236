"""How many CPU cores this process may really use (a container's quota, not the host's core count)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The smallest of: the cores this process may run on (affinity / cpuset) and the CPU quota of its
    cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up. `os.cpu_count()` is
    the host's count: in a container limited to 4 CPUs on a 64-core host, 64 torch threads would thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota(root: Path) -> float | None:
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            limit, period = v2.read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.exists() and period_file.exists():
            quota_us, period_us = int(quota_file.read_text()), int(period_file.read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None  # unreadable or odd: fall back to the affinity count
    return None
