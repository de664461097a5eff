"""The router (a real process) in front of misbehaving backends (tests/runtime/fake_backend.py): a silent
backend is a 504 after the read timeout, a stream past the request's deadline or cut by a dying backend
ends with an OpenAI-shaped error event (not a silent truncation), a client that leaves a non-streaming
request has the upstream connection closed, as does one that stops reading a stream (after
--client-write-timeout), and a backend answering 503 is ejected at once."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.fake_backend import FakeBackend, raw_post
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import http_get


def router_for(
    *backends: FakeBackend, log_dir: Path, name: str, extra: tuple[str, ...] = ()
) -> RouterProcess:
    service = ",".join(b.address for b in backends)
    args = ["--served-model-name", "m", "--policy", "round-robin", "--worker-service", service]
    router = RouterProcess(args=[*args, "--health-interval", "0.2", *extra], log_dir=log_dir, name=name)
    router.wait_ready()
    return router


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def quick(backend: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    """Reads time out after 1 s of silence; a request may take 3 s in all."""
    timeouts = ("--upstream-read-timeout", "1", "--request-timeout", "3")
    router = router_for(backend, log_dir=tmp_path_factory.mktemp("quick"), name="quick", extra=timeouts)
    yield router
    router.stop()


def events(body: bytes) -> list[Any]:
    """The SSE events' data: JSON objects, and "[DONE]"."""
    out: list[Any] = []
    for event in body.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event.removeprefix(b"data: ")
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def test_a_silent_backend_is_a_504_after_the_read_timeout(backend: FakeBackend, quick: RouterProcess) -> None:
    backend.closed.clear()
    start = time.monotonic()
    status, body = raw_post(f"{quick.url}/v1/completions", {"prompt": "hang"}, timeout=20)
    assert status == 504
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    assert "sent nothing for 1 s" in error["message"]
    assert time.monotonic() - start < 5
    assert backend.closed.wait(5), "the router kept the silent backend's connection open"


def test_a_stream_past_its_deadline_ends_with_an_error_event(quick: RouterProcess) -> None:
    start = time.monotonic()
    status, body = raw_post(f"{quick.url}/v1/completions", {"prompt": "drip", "stream": True}, timeout=30)
    assert status == 200
    got = events(body)
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    assert "deadline" in error["message"]
    assert all(e["choices"][0]["text"] == "tok" for e in got[:-2])
    assert len(got) > 4  # some events went through before the deadline
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("prompt", ["die", "nodone"])
def test_a_backend_dying_mid_stream_gives_an_error_event(quick: RouterProcess, prompt: str) -> None:
    quick.wait_ready()  # the backend is back in rotation (a stream cut by a dying backend ejects it)
    status, body = raw_post(f"{quick.url}/v1/completions", {"prompt": prompt, "stream": True})
    assert status == 200
    got = events(body)
    assert [e["choices"][0]["text"] for e in got[:2]] == ["tok", "tok"]
    assert got[2]["error"]["code"] == "backend_failed"
    assert got[2]["error"]["type"] == "server_error"
    assert got[3:] == ["[DONE]"]


def test_a_client_leaving_a_non_streaming_request_closes_the_upstream(
    backend: FakeBackend, tmp_path: Path
) -> None:
    router = router_for(backend, log_dir=tmp_path, name="patient")  # default timeouts: minutes
    try:
        backend.closed.clear()
        posts = backend.posts
        data = json.dumps({"prompt": "hang"}).encode()
        with socket.create_connection(("127.0.0.1", router.port)) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
            sock.sendall(head.encode() + data)
            deadline = time.monotonic() + 10
            while backend.posts == posts and time.monotonic() < deadline:
                time.sleep(0.02)
            assert backend.posts == posts + 1
        assert backend.closed.wait(5), "the router did not cancel the upstream request"
    finally:
        router.stop()


def test_a_backend_answering_503_is_ejected_at_once(tmp_path: Path) -> None:
    busy, ok = FakeBackend(post_status=503), FakeBackend()
    router = router_for(busy, ok, log_dir=tmp_path, name="ejector", extra=("--health-interval", "60"))
    try:
        for _ in range(6):
            status, body = raw_post(f"{router.url}/v1/completions", {"prompt": "hi"})
            assert status == 200, body
        assert busy.posts == 1  # retried on the other backend, then never picked again
        assert router.metric("kubemoe_router_backend_healthy", role="worker", backend=busy.address) == 0
    finally:
        router.stop()
        busy.close()
        ok.close()


def test_a_busy_backend_is_passed_over_but_stays_in_rotation(tmp_path: Path) -> None:
    """A 503 `queue_full` (the engine's waiting queue is full) moves the request on without ejecting that
    backend: ejecting every loaded backend would empty the role and take the router's /ready down."""
    busy = FakeBackend(post_status=503, error_code="queue_full", retry_after="1")
    router = router_for(busy, log_dir=tmp_path, name="busy", extra=("--health-interval", "60"))
    try:
        for _ in range(3):
            status, body = raw_post(f"{router.url}/v1/completions", {"prompt": "hi"})
            assert status == 503, body  # the backend's own refusal, relayed
            assert json.loads(body)["error"]["code"] == "queue_full"
        assert busy.posts == 3  # picked every time: never ejected
        assert router.metric("kubemoe_router_backend_healthy", role="worker", backend=busy.address) == 1
        assert (
            router.metric(
                "kubemoe_router_backend_errors_total", role="worker", backend=busy.address, kind="busy"
            )
            == 3
        )
        assert http_get(f"{router.url}/ready")[0] == 200
        busy.post_status = 200  # no longer busy: served, no probe needed
        assert raw_post(f"{router.url}/v1/completions", {"prompt": "hi"})[0] == 200
    finally:
        router.stop()
        busy.close()


def test_a_client_that_stops_reading_a_stream_is_given_up(backend: FakeBackend, tmp_path: Path) -> None:
    """A client that reads a stream's head, then nothing: once the buffers on the way are full, the router's
    write to it waits; past --client-write-timeout the router closes the backend's connection (the engine
    would stop generating for no one), counts the request 499, and closes the client's connection, the body
    cut. Fails on the old code: the write waited for as long as the client held the connection, and the
    backend's stream with it."""
    router = router_for(backend, log_dir=tmp_path, name="stalled", extra=("--client-write-timeout", "1"))
    try:
        backend.closed.clear()
        data = json.dumps({"prompt": "flood", "stream": True}).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            sock.settimeout(30)
            sock.connect(("127.0.0.1", router.port))
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
            sock.sendall(head.encode() + data)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            stalled = time.monotonic()
            assert backend.closed.wait(30), "the router kept relaying to a client that reads nothing"
            print(f"the backend's stream was closed {time.monotonic() - stalled:.1f} s after the stall")
            code = router.metric("kubemoe_router_requests_total", endpoint="/v1/completions", code="499")
            assert code == 1
            assert "took nothing for 1 s" in router.log()
            while chunk := sock.recv(1 << 20):  # what was queued for the client, then the close
                answer += chunk
        assert not answer.endswith(b"\r\n0\r\n\r\n"), "a stream given up must not look complete"
        assert b"[DONE]" not in answer
    finally:
        router.stop()
