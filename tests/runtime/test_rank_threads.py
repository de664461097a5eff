"""Each torch-engine rank's CPU threads: the pod's CPU budget (its CPU set, less a cgroup quota) shared by
its ranks (serve/threads.py). The cgroup files are written here as the kernel writes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch.serve import threads

CPUS = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def no_omp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def v2(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cpu.max").write_text(text + "\n")
    return tmp_path


def v1(tmp_path: Path, quota: int, period: int) -> Path:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "want"),
    [("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5), ("400000 100000", 4.0)],
)
def test_quota_from_cgroup_v2(tmp_path: Path, text: str, want: float | None) -> None:
    assert threads.quota_cpus(v2(tmp_path, text)) == want


def test_quota_from_cgroup_v1_and_none_without_a_cgroup(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert threads.quota_cpus(v1(tmp_path / "a", 250000, 100000)) == 2.5
    assert threads.quota_cpus(v1(tmp_path / "b", -1, 100000)) is None, "v1 writes -1 for no quota"
    assert threads.quota_cpus(tmp_path / "nothing") is None


def test_budget_is_the_cpu_set_less_the_quota_rounded_up(tmp_path: Path) -> None:
    assert threads.cpu_budget(v2(tmp_path, "max 100000")) == CPUS
    assert threads.cpu_budget(v2(tmp_path, "50000 100000")) == 1, "half a CPU is still one thread"
    assert threads.cpu_budget(v2(tmp_path, f"{(CPUS + 8) * 100000} 100000")) == CPUS, "never past the CPU set"
    assert threads.cpu_budget(v2(tmp_path, "garbage 100000")) == CPUS, "an unreadable quota: the CPU set"


def test_ranks_share_the_budget_and_omp_num_threads_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = v2(tmp_path, "800000 100000")  # 8 CPUs' worth
    budget = min(CPUS, 8)
    assert threads.threads_per_rank(1, root=root) == budget
    assert threads.threads_per_rank(4, root=root) == max(1, budget // 4)
    assert threads.threads_per_rank(64, root=root) == 1, "at least one thread a rank"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.threads_per_rank(4, root=root) is None


def test_set_rank_threads_sets_torchs_count(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "cpu_budget", lambda root=threads.CGROUP: 6)
    try:
        assert threads.set_rank_threads(3) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
