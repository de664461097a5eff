"""A rank that stays connected but goes silent (serve/pod.py's serving timeout, group.py's Heartbeat), in
real processes: an EP=2 group over two pods, the leader (rank 0, the API) and a --headless worker (rank 1).

The fault is SIGSTOP: the frozen process keeps its sockets open and sends no FIN or RST, as a rank stuck
in a device call, a partitioned node or a node gone dark does. Before, every serving collective had the
30-minute weight-loading timeout: the leader's engine thread blocked in gloo for that long while /health
and /ready answered 200 (the GIL is released) and admitted requests hung.

- With a short serving timeout the leader's next collective fails within it: the group fails as for a
  lost rank (the request in flight ends, exit 1).
- With a long one, the heartbeat: /health 500 and /ready 503 once the engine thread has made no progress
  for KUBEMOE_ENGINE_STALL_S, on the leader and on a headless worker alike; both recover when the frozen
  peer resumes (a probe needs several failures in a row before the pod is restarted).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.serve.timeouts import (
    KEEPALIVE_S,
    PLACEMENT_TIMEOUT_ENV,
    STALL_ENV,
    Timeouts,
)
from kubemoe_runtime.pod.drain import SHUTDOWN_S
from kubemoe_runtime.pod.ports import free_port
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
COLLECTIVE_ENV = "KUBEMOE_COLLECTIVE_TIMEOUT_S"
SHORT_S = 5.0  # the serving timeout these tests give: a tiny model's step takes milliseconds


class Group:
    """One EP=2 group over two pods, each started with `env` (the timeouts)."""

    def __init__(self, qwen: Path, logs: Path, env: Mapping[str, str]) -> None:
        group = ["--served-model-name", MODEL, "--max-model-len", "128", "--drain-timeout", "60"]
        group += ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--enable-expert-parallel"]
        group += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
        leader = [*group, "--data-parallel-start-rank", "0"]
        self.leader = Server(qwen, args=leader, log_dir=logs, name="leader", env=env)
        worker = [*group, "--data-parallel-start-rank", "1", "--headless"]
        self.worker = Server(qwen, args=worker, log_dir=logs, name="worker", env=env)

    def stop(self) -> None:
        for server in (self.worker, self.leader):  # a frozen process would not act on SIGTERM
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
        self.worker.stop()
        self.leader.stop()


@pytest.fixture
def start_group(qwen: Path, tmp_path: Path) -> Iterator[Callable[[Mapping[str, str]], Group]]:
    groups: list[Group] = []

    def start(env: Mapping[str, str]) -> Group:
        group = Group(qwen, tmp_path, env)
        groups.append(group)
        group.leader.wait_ready()
        group.worker.wait_ready()
        return group

    try:
        yield start
    finally:
        for group in groups:
            group.stop()


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, log: Callable[[], str]) -> float:
    """Seconds until `condition()` held."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:.0f} s\n{log()}"
        time.sleep(0.05)
    return time.monotonic() - start


def status(server: Server, path: str) -> int | None:
    """The status of GET `path`; None once the server no longer answers."""
    try:
        return http_get(f"{server.url}{path}")[0]
    except OSError:
        return None


def test_the_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Timeouts.from_env() == Timeouts(collective_s=120.0, stall_s=150.0, placement_load_s=600.0)
    monkeypatch.setenv(COLLECTIVE_ENV, "7.5")
    assert Timeouts.from_env().stall_s == 37.5  # the margin follows the collective timeout
    monkeypatch.setenv(STALL_ENV, "9")
    monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, "11")
    assert Timeouts.from_env() == Timeouts(collective_s=7.5, stall_s=9.0, placement_load_s=11.0)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(STALL_ENV, bad)
        with pytest.raises(ValueError, match=f"{STALL_ENV}='{bad}': expected a positive number of seconds"):
            Timeouts.from_env()


class Completion:
    """A non-streamed completion posted on its own thread: when (and whether) it ended."""

    def __init__(self, server: Server) -> None:
        body = {"model": MODEL, "prompt": [3, 17, 92, 5], "max_tokens": 50, "ignore_eos": True}
        self.data = json.dumps(body).encode()
        self.port = server.port
        self.ended: float | None = None
        self.answer = b""
        self.thread = threading.Thread(target=self._post, daemon=True)
        self.thread.start()

    def _post(self) -> None:
        head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(self.data)}\r\nconnection: close\r\n\r\n"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=600) as sock:
                sock.sendall(head.encode() + self.data)
                while chunk := sock.recv(65536):
                    self.answer += chunk
        except OSError:
            pass  # the server went away: the request ended too
        self.ended = time.monotonic()


@pytest.mark.slow
def test_a_silent_worker_fails_the_leader_within_the_serving_timeout(
    start_group: Callable[[Mapping[str, str]], Group],
) -> None:
    group = start_group({COLLECTIVE_ENV: str(SHORT_S)})
    leader, worker = group.leader, group.worker
    os.kill(worker.process.pid, signal.SIGSTOP)  # rank 1 goes silent, its sockets open
    frozen = time.monotonic()
    request = Completion(leader)  # admitted: its first step's collectives wait for rank 1
    # The step (or the keepalive before it) fails SHORT_S after it began; the pod then ends as for a lost
    # rank. Before, both waited 30 minutes.
    bound = KEEPALIVE_S + SHORT_S + SHUTDOWN_S + 15
    code = leader.process.wait(timeout=bound)
    failed_after = time.monotonic() - frozen
    assert code == 1, leader.log()
    assert "Timed out" in leader.log(), leader.log()  # gloo's own error, recorded as the group's failure
    request.thread.join(timeout=10)
    assert request.ended is not None, "the request in flight never ended"
    assert request.ended - frozen < bound
    # Its answer: a 503 the router retries elsewhere (not a 200 with an empty "abort"), or the
    # connection closed as the pod ended.
    assert not request.answer or request.answer.startswith(b"HTTP/1.1 503"), request.answer
    assert not request.answer or b'"engine_failed"' in request.answer, request.answer
    print(f"rank 1 frozen: the leader failed after {failed_after:.1f} s (serving timeout {SHORT_S} s)")
    print(f"the request in flight got: {request.answer[:12]!r}")


@pytest.mark.slow
def test_an_engine_thread_stuck_in_a_collective_fails_health(
    start_group: Callable[[Mapping[str, str]], Group],
) -> None:
    # The collectives' timeout (10 minutes) does not fire here: the heartbeat must.
    stall = 5.0  # over KEEPALIVE_S: an idle engine thread beats at each keepalive
    group = start_group({COLLECTIVE_ENV: "600", STALL_ENV: str(stall)})
    leader, worker = group.leader, group.worker
    assert (status(leader, "/health"), status(worker, "/health")) == (200, 200)

    os.kill(worker.process.pid, signal.SIGSTOP)  # the leader's next keepalive blocks in gloo
    bound = KEEPALIVE_S + stall + 10
    took = wait_for(
        lambda: status(leader, "/health") == 500, timeout=bound, what="leader /health 500", log=leader.log
    )
    assert status(leader, "/ready") == 503
    body = http_get(f"{leader.url}/health")[1]
    assert "the engine thread has made no progress for" in body, body
    ready = json.loads(http_get(f"{leader.url}/ready")[1])
    assert ready["status"] == "failed"
    assert "no progress" in ready["message"]
    assert leader.process.poll() is None  # stuck, not failed: the liveness probe restarts it
    assert "no progress for" in leader.log()
    os.kill(worker.process.pid, signal.SIGCONT)  # the keepalive goes through: progress again
    wait_for(lambda: status(leader, "/health") == 200, timeout=30, what="leader recovers", log=leader.log)
    assert status(leader, "/ready") == 200
    print(f"leader: /health 500 {took:.1f} s after rank 1 froze (limit {stall} s)")

    os.kill(leader.process.pid, signal.SIGSTOP)  # rank 0 silent: the worker waits for its next message
    took = wait_for(
        lambda: status(worker, "/health") == 500, timeout=bound, what="worker /health 500", log=worker.log
    )
    assert status(worker, "/ready") == 503
    assert worker.process.poll() is None
    os.kill(leader.process.pid, signal.SIGCONT)
    wait_for(lambda: status(worker, "/health") == 200, timeout=30, what="worker recovers", log=worker.log)
    assert status(leader, "/health") == 200
    print(f"headless worker: /health 500 {took:.1f} s after rank 0 froze (limit {stall} s)")
