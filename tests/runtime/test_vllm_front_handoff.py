"""The vLLM front holds a draining prefill up while the KV it handed off may wait for its decode's pull.

vLLM's connector moves the KV engine to engine, out of the front's sight, so the front notes when it
answered a request signed `do_remote_decode` and, while draining, counts it as pending for KV_HOLD_S
(engines/vllm/front.py `VllmUpstream.kv_waiting`, passed to `Drain(pending=...)` by supervise.py).
The front runs in uvicorn here; the "vLLM" behind it is the router tests' stand-in HTTP engine (a real
vLLM is test_vllm_server's, minutes to start), under a stand-in process that only has to be alive."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kubemoe_runtime.engines.vllm.front import KV_HOLD_S, VllmUpstream, front_app
from kubemoe_runtime.pod.drain import Drain
from kubemoe_runtime.pod.kv_auth import KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels
from tests.runtime.app_thread import serving
from tests.runtime.fake_backend import FakeBackend

KEY = b"front-handoff-key-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def front() -> Iterator[tuple[str, VllmUpstream, Clock]]:
    backend = FakeBackend()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    clock = Clock()
    upstream = VllmUpstream(
        process=process,
        url=f"http://{backend.address}",
        headless=False,
        labels=MetricLabels(role="prefill"),
        clock=clock,
    )
    try:
        with serving(front_app(upstream, signer=KVSigner(KEY)), what="the front") as port:
            yield f"http://127.0.0.1:{port}", upstream, clock
    finally:
        process.kill()
        process.wait()
        backend.close()


def post(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_a_hand_off_keeps_a_draining_prefill_up_for_the_hold(front: tuple[str, VllmUpstream, Clock]) -> None:
    url, upstream, clock = front
    drain = Drain(quiet_s=0.0, pending=upstream.kv_waiting)
    body = {"model": "m", "prompt": "p", "max_tokens": 1}
    assert post(url, body) == 200
    assert upstream.kv_waiting() == 0  # a plain request leaves nothing behind
    signed = KVSigner(KEY).sign({"do_remote_decode": True, "do_remote_prefill": False})
    assert post(url, {**body, "kv_transfer_params": signed}) == 200
    assert upstream.kv_waiting() == 1
    drain.begin(timeout=600)
    assert not drain.done()  # the KV may still be pulled
    clock.now += KV_HOLD_S + 1
    assert upstream.kv_waiting() == 0
    assert drain.done()


def test_a_refused_or_unsigned_hand_off_holds_nothing(front: tuple[str, VllmUpstream, Clock]) -> None:
    url, upstream, _ = front
    forged = {"do_remote_decode": True}  # not signed: the front answers 400 and vLLM never sees it
    assert post(url, {"model": "m", "prompt": "p", "kv_transfer_params": forged}) == 400
    assert upstream.kv_waiting() == 0
