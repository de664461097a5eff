"""How a headless vLLM pod (a group's other pods) ends, and the exit code it reports.

The review's finding was that a headless worker exits 0 when its leader stops and the pod's 1 for that
restarts it during every teardown. Run for real, it does not: with its leader gone, a headless vLLM
keeps running (vLLM 0.32: its engines wait on) until the group's teardown sends it SIGTERM, a requested
stop, which the pod reports as 0. The 0 the review saw came after the worker's own engine crashed
(finding #4's all_gatherv): vLLM's headless mode returns 0 once any of its engines has ended, crashed
or not, so an unasked 0 stays a failure (1), as for the leader (engines/vllm/supervise.py).

The first test runs a real two-pod group of vLLM's CPU build (leader + --headless worker, as the
operator renders a LeaderWorkerSet; about two minutes). The others drive the Supervisor with a child
that ends as told: vLLM cannot be made to end with a given code on demand.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.vllm.supervise import Supervisor
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.engine_python import VLLM
from tests.runtime.serving import Server

OUTLIVES_S = 20.0
"""How long the worker is watched after its leader has stopped (it kept running two minutes here)."""


def _ended(code: int) -> subprocess.Popen[bytes]:
    """A child that has ended with `code` (-N: killed by signal N)."""
    code_line = "import time; time.sleep(60)" if code < 0 else f"raise SystemExit({code})"
    process = subprocess.Popen([sys.executable, "-c", code_line])
    if code < 0:
        process.send_signal(-code)
    process.wait(timeout=30)
    return process


@pytest.mark.parametrize(("code", "pod"), [(0, 1), (3, 3), (-signal.SIGKILL, 137)])
def test_an_unasked_end_fails_the_pod(code: int, pod: int) -> None:
    assert Supervisor(_ended(code)).exit_code() == pod


def test_a_requested_stop_is_a_clean_end() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor(child)
    supervisor.request_stop(signal.SIGTERM)
    child.wait(timeout=30)
    assert supervisor.exit_code() == 0


@pytest.mark.slow
def test_a_worker_outlives_its_leader_until_the_groups_teardown_stops_it(tmp_path: Path) -> None:
    model = write_tiny_checkpoint(tmp_path / "qwen", arch="qwen3_moe", dtype=torch.float32)
    env = {
        "KUBEMOE_VLLM_PYTHON": VLLM.python(),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "KUBEMOE_DRAIN_TIMEOUT_S": "5",
    }
    group = ["--engine", "vllm", "--role", "decode", "--served-model-name", "tiny", "--enforce-eager"]
    group += ["--max-model-len", "256", "--block-size", "32", "--tensor-parallel-size", "1"]
    group += ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--enable-expert-parallel"]
    group += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
    leader = Server(
        model, args=[*group, "--data-parallel-start-rank", "0"], log_dir=tmp_path, name="leader", env=env
    )
    worker = Server(
        model,
        args=[*group, "--data-parallel-start-rank", "auto", "--headless"],
        log_dir=tmp_path,
        name="worker",
        env={**env, "LWS_WORKER_INDEX": "1"},
    )
    try:
        leader.wait_ready(timeout=600)  # vLLM's API server is up once every engine of the group is
        leader.process.send_signal(signal.SIGTERM)
        assert leader.process.wait(timeout=120) == 0, leader.log()[-4000:]
        deadline = time.monotonic() + OUTLIVES_S
        while time.monotonic() < deadline:
            assert worker.process.poll() is None, f"the worker ended by itself:\n{worker.log()[-4000:]}"
            time.sleep(1)
        worker.process.send_signal(signal.SIGTERM)  # the group's teardown
        assert worker.process.wait(timeout=120) == 0, worker.log()[-4000:]
    finally:
        leader.stop()
        worker.stop()
