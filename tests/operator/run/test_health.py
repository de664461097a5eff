"""The operator's /healthz and /readyz: served from process start, a standby is alive and ready
(it watches the Lease), and leadership is a metric, not readiness."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx2
import pytest
from lightkube import AsyncClient
from lightkube.resources.coordination_v1 import Lease

from kubemoe_operator.kube.leader import LeaderElector, LeaseConfig
from kubemoe_operator.local.layout import free_port
from kubemoe_operator.run.health import Health, HealthServer


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize(
    ("health", "ready"),
    [
        (Health(), False),  # nothing yet
        (Health(lease_reachable=True), True),  # a standby watching the Lease
        (Health(leading=True, lease_reachable=True), False),  # just won it, watches not started
        (Health(leading=True, watching=True), True),
        (Health(leader_election=False), False),
        (Health(leader_election=False, leading=True, watching=True), True),
    ],
)
def test_ready_means_watching_the_lease_or_the_resources(health: Health, ready: bool) -> None:
    assert health.ready()[0] is ready


async def test_server_answers_healthz_and_readyz() -> None:
    health = Health()
    server = HealthServer(health, port=free_port(), host="127.0.0.1")
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx2.AsyncClient() as client:
            assert (await client.get(f"{base}/healthz")).status_code == 200
            unready = await client.get(f"{base}/readyz")
            assert unready.status_code == 503
            assert "Lease could not be read" in unready.text
            health.lease_reachable = True
            ready = await client.get(f"{base}/readyz")
            assert (ready.status_code, ready.text.strip()) == (200, "standby: watching the Lease")
            assert (await client.get(f"{base}/nope")).status_code == 404
            assert (await client.post(f"{base}/healthz")).status_code == 405
    finally:
        await server.stop()


class FakeLeases:
    """get() of a Lease: an error, or a Lease another candidate holds."""

    def __init__(self, *, fail: bool) -> None:
        self.fail = fail
        self.calls = 0

    async def get(self, _kind: type[Lease], _name: str, *, namespace: str) -> Lease:
        self.calls += 1
        if self.fail:
            raise httpx2.ConnectError("connection refused")
        # Renewed just now, at each read: a renewTime fixed at import would expire 15 s into a long run.
        renewed = datetime.now(UTC).isoformat()
        spec = {"holderIdentity": "other", "renewTime": renewed, "leaseDurationSeconds": 15}
        return cast(Lease, Lease.from_dict({"metadata": {"name": "l", "resourceVersion": "1"}, "spec": spec}))


@pytest.mark.parametrize("fail", [True, False])
async def test_acquire_reports_whether_each_attempt_reached_the_api(fail: bool) -> None:
    fake = FakeLeases(fail=fail)
    elector = LeaderElector(cast(AsyncClient, fake), LeaseConfig(name="l", namespace="ns", identity="me"))
    seen: list[bool] = []
    task = asyncio.create_task(elector.acquire(reached=seen.append))
    while not seen:
        await asyncio.sleep(0.01)
    task.cancel()
    assert seen == [not fail]


class _LeaseHeldElsewhere(BaseHTTPRequestHandler):
    """A Kubernetes API server that knows one Lease, held and freshly renewed by another operator."""

    def do_GET(self) -> None:
        if "/leases/" not in self.path:
            self.send_error(404)
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = json.dumps(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "kubemoe-operator", "namespace": "default", "resourceVersion": "7"},
                "spec": {"holderIdentity": "the-leader", "renewTime": now, "leaseDurationSeconds": 3600},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LeaseHeldElsewhere)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(config))
    return path


def _wait_for(url: str, want: int, *, timeout: float = 30) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    answer: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            answer = get(url)
        except (urllib.error.URLError, ConnectionError):
            answer = (0, "not listening")
        if answer[0] == want:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{url}: {answer}, wanted {want}")


@pytest.mark.parametrize("reachable", [True, False], ids=["standby", "api-unreachable"])
def test_a_standby_operator_process_is_alive_and_ready_from_the_start(
    api_server: str, tmp_path: Path, reachable: bool
) -> None:
    """The real `python -m kubemoe_operator`, against an API server whose Lease another replica holds:
    it never leads, yet /healthz and /readyz answer 200 and kubemoe_operator_leader is 0. With the
    API server unreachable it is alive but not ready."""
    server = api_server if reachable else f"http://127.0.0.1:{free_port()}"
    health, metrics = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(_kubeconfig(tmp_path / "kubeconfig", server))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    args = ["--health-port", str(health), "--metrics-port", str(metrics), "--lease-seconds", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubemoe_operator", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(f"http://127.0.0.1:{health}/healthz", 200)[1].strip() == "ok"
        if reachable:
            body = _wait_for(f"http://127.0.0.1:{health}/readyz", 200)[1]
            assert body.strip() == "standby: watching the Lease"
            assert "kubemoe_operator_leader 0.0" in _wait_for(f"http://127.0.0.1:{metrics}/metrics", 200)[1]
        else:
            time.sleep(2)  # a few lease attempts, each failing
            assert get(f"http://127.0.0.1:{health}/readyz")[0] == 503
        assert proc.poll() is None, "a standby keeps running"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
