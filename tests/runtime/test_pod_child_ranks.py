"""How a torch-engine pod ends its child rank processes (serve/pod.py `PodProcess.finish`): a rank that exits
is joined; once the pod failed, a rank that does not exit (frozen: SIGSTOP, as a rank stuck in a device
call or a node gone dark) gets a short join, SIGTERM, then SIGKILL, and is reaped, so the pod exits within
seconds and leaves nothing behind. Before, it waited 15 s, sent SIGTERM (which a stopped process never
acts on), waited 5 s more and exited, leaving the stopped rank orphaned.

The children here are stand-ins for ranks (real processes, started as pod.py starts its ranks, that sleep
or exit): what `finish` does to a process does not depend on what the process runs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.serve.pod_process import PodProcess
from kubemoe_runtime.engines.torch.serve.rank_job import RankJob
from kubemoe_runtime.engines.torch.serve.timeouts import FAILED_JOIN_S, TERMINATE_WAIT_S
from kubemoe_runtime.pod.settings import parse_args

BOUND_S = FAILED_JOIN_S + 2 * TERMINATE_WAIT_S + 10  # the waits, and a busy machine's margin


def rank_stand_in(seconds: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as run_rank_process
    time.sleep(seconds)


@pytest.fixture
def pod(qwen: Path) -> Iterator[PodProcess]:
    settings, _ = parse_args(["--model", str(qwen), "--data-parallel-size", "2", "--enable-expert-parallel"])
    job = RankJob(
        model=qwen, dtype="float32", size=2, address="127.0.0.1", port=0, max_model_len=64, max_num_seqs=1
    )
    pod = PodProcess(settings, job)
    yield pod
    for child in pod.children:  # whatever the test left: no process outlives it
        if child.is_alive():
            os.kill(child.pid or 0, signal.SIGKILL)
            child.join(timeout=10)


def start(pod: PodProcess, seconds: float) -> BaseProcess:
    child = mp.get_context("spawn").Process(target=rank_stand_in, args=(seconds,), name="rank-1", daemon=True)
    child.start()
    pod.children.append(child)
    return child


def reaped(pid: int) -> bool:
    """No process `pid`, not even a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] not in "RSDTtZ"  # gone, or reused by another
    except FileNotFoundError:
        return True


def test_a_failed_pod_kills_a_frozen_rank_and_reaps_it(pod: PodProcess) -> None:
    child = start(pod, 600)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)  # frozen: SIGTERM stays pending, only SIGKILL ends it
    pod.fail("rank-1 made no progress")
    began = time.monotonic()
    assert pod.finish() == 1
    took = time.monotonic() - began
    assert not child.is_alive()
    assert child.exitcode == -signal.SIGKILL
    assert reaped(child.pid)
    assert took < BOUND_S, f"finish took {took:.1f} s"
    print(f"a failed pod ended its frozen rank in {took:.1f} s")


def test_a_rank_that_exits_is_joined_not_killed(pod: PodProcess) -> None:
    child = start(pod, 0.5)  # ends as a rank does on rank 0's Shutdown
    assert pod.finish() == 0
    assert child.exitcode == 0
    assert child.pid is not None
    assert reaped(child.pid)
