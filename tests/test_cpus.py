"""CPU count from the container's quota, not the host's cores."""

from __future__ import annotations

import os

from avatar_forcing.model.cpus import usable_cpus


def test_cgroup_v2_quota_limits_the_count(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota: the cores we may run on
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_unlimited_or_unreadable_falls_back_to_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
