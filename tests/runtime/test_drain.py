"""Graceful drain (pod/drain.py) in real processes: after SIGTERM an engine server or a router answers
/ready and new requests 503 (the router then ejects the engine at once and serves from another backend)
while a request already in flight finishes normally (a stream to its last token), then exits 0; a drain
ends at its timeout (the router answers what it still holds 503 there and then, a stream with an error
event and [DONE]) or on a second signal. A group over two pods: the leader drains, then ends the group
(its headless worker exits 0); a headless worker does not drain but leaves its group at once, and the
leader, noticing the lost rank, fails at once, drain or not.

A request is "in flight" deterministically: it is sent with `Expect: 100-continue` and no body; the
server answers `100 Continue` only once the app is running and asks for the body (`Held`)."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemoe_runtime.engines.torch.serve.timeouts import KEEPALIVE_S
from kubemoe_runtime.pod.drain import SHUTDOWN_S, Drain, DrainingServer, DrainMiddleware
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.router.app import build_router_app
from kubemoe_runtime.router.main import RouterSettings, build
from tests.runtime.fake_backend import FakeBackend, parse_response, raw_post
from tests.runtime.held_request import Held
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import Server, http_get, http_post

MODEL = "tiny-qwen"


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def refused_as_draining(url: str, body: dict[str, Any]) -> None:
    status, answer = http_post(url, body)
    assert status == 503, answer
    assert answer["error"]["code"] == "draining"
    assert answer["error"]["type"] == "server_error"


# --- the logic, alone -------------------------------------------------------------------------------


def test_a_drain_ends_when_idle_for_the_quiet_period_or_at_its_deadline() -> None:
    drain = Drain(quiet_s=0.5)
    assert not drain.done()  # not draining: never done
    drain.enter()
    drain.begin(timeout=10)
    now = time.monotonic()
    assert not drain.done(now + 5)  # a request in flight
    assert drain.done(now + 11)  # the deadline
    drain.leave()
    idle = time.monotonic()
    assert not drain.done(idle + 0.1)  # a KV pull may follow the answer
    assert drain.done(idle + 0.6)


def test_a_drain_waits_for_pending_kv_until_its_deadline() -> None:
    waiting = [2]
    drain = Drain(quiet_s=0.0, pending=lambda: waiting[0])
    drain.begin(timeout=10)
    now = time.monotonic()
    assert not drain.done(now + 5)  # prefilled KV not yet pulled
    waiting[0] = 0
    assert drain.done(now + 5)
    waiting[0] = 1
    assert drain.done(now + 11)  # the deadline ends it regardless


# --- an engine, and the router in front of it --------------------------------------------------------

STREAMED_TOKENS = 100
STREAM = {
    "model": MODEL,
    "prompt": "hello world",
    "max_tokens": STREAMED_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def engine_args(*extra: str) -> list[str]:
    return ["--served-model-name", MODEL, "--max-model-len", "128", "--drain-timeout", "60", *extra]


def full_stream(status: int, body: bytes) -> None:
    """A streamed completion answered in full: every token, then [DONE], no error event."""
    assert status == 200, body
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == STREAMED_TOKENS


def test_an_engine_drains_and_the_router_ejects_it_at_once(qwen: Path, tmp_path: Path) -> None:
    engine = Server(qwen, args=engine_args(), log_dir=tmp_path, name="engine")
    spare = FakeBackend()
    router: RouterProcess | None = None
    try:
        engine.wait_ready()
        # The health loop probes once a minute: only the engine's 503 can eject it in this test.
        service = f"127.0.0.1:{engine.port},{spare.address}"
        router_args = ["--served-model-name", MODEL, "--policy", "round-robin", "--worker-service", service]
        router = RouterProcess(args=[*router_args, "--health-interval", "60"], log_dir=tmp_path)
        router.wait_ready()
        held = Held(engine.port, "/v1/completions", STREAM)

        engine.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http_get(f"{engine.url}/ready")[0] == 503)
        assert http_get(f"{engine.url}/ready") == (503, "draining")
        assert http_get(f"{engine.url}/health")[0] == 200  # liveness must not restart a draining pod
        assert http_get(f"{engine.url}/metrics")[0] == 200
        refused_as_draining(f"{engine.url}/v1/completions", {**STREAM, "stream": False})
        assert engine.process.poll() is None  # still there: a request is in flight

        request = {"model": MODEL, "prompt": "hello world", "max_tokens": 5}
        for _ in range(4):  # round robin: a request that meets the engine is retried on the spare
            status, body = raw_post(f"{router.url}/v1/completions", request)
            assert status == 200, body
        assert spare.posts == 4
        assert router.metric("kubemoe_router_backend_healthy", backend=f"127.0.0.1:{engine.port}") == 0

        full_stream(*held.finish())  # the stream in flight when SIGTERM came is answered to its end
        assert engine.process.wait(timeout=30) == 0, engine.log()
        assert "draining: 1 request(s) in flight" in engine.log()
    finally:
        if router is not None:
            router.stop()
        engine.stop()
        spare.close()


class Group:
    """One EP=2 serving group over two pods: the leader (rank 0, the API) and a headless worker (rank 1)."""

    def __init__(self, qwen: Path, logs: Path) -> None:
        group = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--enable-expert-parallel"]
        group += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
        self.leader = Server(
            qwen, args=engine_args(*group, "--data-parallel-start-rank", "0"), log_dir=logs, name="leader"
        )
        worker_args = engine_args(*group, "--data-parallel-start-rank", "1", "--headless")
        self.worker = Server(qwen, args=worker_args, log_dir=logs, name="worker")

    def wait_ready(self) -> None:
        self.leader.wait_ready()
        self.worker.wait_ready()

    def stop(self) -> None:
        self.worker.stop()
        self.leader.stop()


def answers_ready(server: Server) -> bool:
    try:
        return http_get(f"{server.url}/ready")[0] == 200
    except OSError:  # not listening any more
        return False


@pytest.fixture
def group(qwen: Path, tmp_path: Path) -> Iterator[Group]:
    g = Group(qwen, tmp_path)
    try:
        g.wait_ready()
        yield g
    finally:
        g.stop()


def test_a_group_leader_drains_then_ends_its_group(group: Group) -> None:
    leader, worker = group.leader, group.worker
    held = Held(leader.port, "/v1/completions", STREAM)
    leader.process.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(f"{leader.url}/ready")[0] == 503)
    refused_as_draining(f"{leader.url}/v1/completions", {**STREAM, "stream": False})
    time.sleep(KEEPALIVE_S + 0.5)  # keepalives go on while draining: the group stays whole
    assert leader.process.poll() is None
    assert worker.process.poll() is None
    full_stream(*held.finish())  # generated by both ranks, after SIGTERM
    assert leader.process.wait(timeout=30) == 0, leader.log()
    assert worker.process.wait(timeout=30) == 0, worker.log()  # rank 0's Shutdown: a normal end


def test_a_headless_worker_leaves_its_group_at_once_and_the_leader_fails_fast(group: Group) -> None:
    leader, worker = group.leader, group.worker
    start = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=10) == 0, worker.log()  # no drain, no waiting on rank 0
    left = time.monotonic() - start
    assert left < 5, f"the headless worker took {left:.1f}s to leave"
    assert "draining" not in worker.log()
    wait_for(lambda: not answers_ready(leader), timeout=KEEPALIVE_S + 5)  # 503, or already gone
    noticed = time.monotonic() - start
    assert leader.process.wait(timeout=SHUTDOWN_S + 10) == 1  # a failed group ends the pod
    print(f"headless worker left {left:.2f}s after SIGTERM; the leader noticed after {noticed:.2f}s")


def test_a_draining_leader_whose_group_fails_exits_at_once(group: Group) -> None:
    leader, worker = group.leader, group.worker
    held = Held(leader.port, "/v1/completions", STREAM)  # never finished: the drain alone would wait 60 s
    leader.process.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(f"{leader.url}/ready")[0] == 503)
    start = time.monotonic()
    worker.process.send_signal(signal.SIGKILL)  # its rank is lost
    assert leader.process.wait(timeout=KEEPALIVE_S + SHUTDOWN_S + 10) == 1, leader.log()
    assert time.monotonic() - start < KEEPALIVE_S + SHUTDOWN_S + 5
    assert "Connection closed by peer" in leader.log() or "engine failed" in leader.log(), leader.log()
    held.close()


# --- the router -------------------------------------------------------------------------------------


class GatedStream:
    """A backend whose streamed answer sends one event, then waits for `release` before the rest."""

    def __init__(self) -> None:
        self.release = threading.Event()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                event = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "tok"}]}
                events = [f"data: {json.dumps(event)}\n\n".encode()] * 3 + [b"data: [DONE]\n\n"]
                self._chunk(events[0])
                gate.release.wait(30)
                for e in events[1:]:
                    self._chunk(e)
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gated() -> Iterator[GatedStream]:
    backend = GatedStream()
    yield backend
    backend.close()


def router_for(address: str, tmp_path: Path, *extra: str) -> RouterProcess:
    args = ["--served-model-name", MODEL, "--policy", "round-robin", "--worker-service", address, *extra]
    router = RouterProcess(args=args, log_dir=tmp_path)
    router.wait_ready()
    return router


def test_a_router_finishes_a_stream_in_flight_after_sigterm(gated: GatedStream, tmp_path: Path) -> None:
    router = router_for(gated.address, tmp_path, "--drain-timeout", "60")
    try:
        data = json.dumps({"model": MODEL, "prompt": "p", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", router.port), timeout=30) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n"
            sock.sendall(head.encode() + b"connection: close\r\n\r\n" + data)
            answer = b""
            while b"data: " not in answer:  # the first event went through
                answer += sock.recv(65536)

            router.process.send_signal(signal.SIGTERM)
            wait_for(lambda: http_get(f"{router.url}/ready")[0] == 503)
            assert http_get(f"{router.url}/health")[0] == 200
            refused_as_draining(f"{router.url}/v1/completions", {"model": MODEL, "prompt": "p"})
            assert router.process.poll() is None

            gated.release.set()
            while chunk := sock.recv(65536):
                answer += chunk
        status, body = parse_response(answer)
        assert status == 200
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 4
        assert events[-1] == b"data: [DONE]"
        assert not any(b'"error"' in e for e in events)
        assert router.process.wait(timeout=15) == 0, router.log()
    finally:
        router.stop()


def test_a_drain_stops_at_its_timeout(gated: GatedStream, tmp_path: Path) -> None:
    router = router_for(gated.address, tmp_path, "--drain-timeout", "1")
    try:
        held = Held(router.port, "/v1/completions", {"prompt": "p"})  # never finished
        start = time.monotonic()
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(timeout=1 + SHUTDOWN_S + 10)
        assert time.monotonic() - start >= 1
        held.close()
    finally:
        router.stop()


def test_a_request_still_sending_its_body_at_the_drain_deadline_gets_a_503(
    gated: GatedStream, tmp_path: Path
) -> None:
    """A client still uploading its body at --drain-timeout is answered 503 `draining` there and then.
    Fails on the old code: the router read the body outside what the deadline ends, and uvicorn cut the
    connection SHUTDOWN_S later with no answer."""
    router = router_for(gated.address, tmp_path, "--drain-timeout", "1")
    try:
        held = Held(router.port, "/v1/completions", {"model": MODEL, "prompt": "p"})  # body never sent
        start = time.monotonic()
        router.process.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := held.sock.recv(65536):
            answer += chunk
        ended = time.monotonic() - start
        held.close()
        status, body = parse_response(answer)
        assert status == 503, answer[:300]
        error = json.loads(body)["error"]
        assert (error["code"], error["type"]) == ("draining", "server_error")
        assert ended < 1 + SHUTDOWN_S, f"answered {ended:.1f} s after SIGTERM"
        assert router.process.wait(timeout=SHUTDOWN_S + 10) == 0, router.log()
    finally:
        router.stop()


class Waiting:
    """A non-streaming POST on its own thread: its status and body once the server answered."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.answer: tuple[int, bytes] | None = None
        self.thread = threading.Thread(target=self._post, args=(url, body), daemon=True)
        self.thread.start()

    def _post(self, url: str, body: dict[str, Any]) -> None:
        self.answer = raw_post(url, body, timeout=30)

    def result(self) -> tuple[int, bytes]:
        self.thread.join(timeout=30)
        assert self.answer is not None, "no answer"
        return self.answer


def ended_at_the_deadline(status: int, body: bytes) -> None:
    """A stream the router ended at its drain deadline: the backend's events, then a 503 error event and
    [DONE] (not a silent cut)."""
    assert status == 200  # its head went out as it began
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-3:]
    *chunks, error = [json.loads(e) for e in events[:-1]]
    assert chunks
    assert all(c["choices"][0]["text"] == "tok" for c in chunks)
    assert error["error"]["code"] == "draining"
    assert error["error"]["type"] == "server_error"
    assert "drain timeout" in error["error"]["message"]


def test_a_router_ends_what_is_in_flight_at_its_drain_deadline(tmp_path: Path) -> None:
    """At --drain-timeout a stream still relayed ends with an error event and [DONE], and a request still
    waiting for its backend gets a 503 JSON error, there and then. Fails on the old code: uvicorn cancelled
    both SHUTDOWN_S later, the stream cut with neither an error event nor [DONE], the other a plain-text
    500."""
    backend = FakeBackend()
    router = router_for(backend.address, tmp_path, "--drain-timeout", "1")
    try:
        data = json.dumps({"model": MODEL, "prompt": "drip", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", router.port), timeout=30) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n"
            sock.sendall(head.encode() + b"connection: close\r\n\r\n" + data)
            answer = b""
            while b"data: " not in answer:  # the first event went through
                answer += sock.recv(65536)
            waiting = Waiting(f"{router.url}/v1/completions", {"model": MODEL, "prompt": "hang"})
            wait_for(lambda: backend.posts == 2)  # the backend has it, and will never answer

            router.process.send_signal(signal.SIGTERM)
            start = time.monotonic()
            while chunk := sock.recv(65536):
                answer += chunk
            ended = time.monotonic() - start
        ended_at_the_deadline(*parse_response(answer))
        status, body = waiting.result()
        assert status == 503, body
        error = json.loads(body)["error"]
        assert (error["code"], error["type"]) == ("draining", "server_error")
        assert ended < 1 + SHUTDOWN_S, f"the stream ended {ended:.1f} s after SIGTERM"
        assert backend.closed.wait(5), "the waiting request's backend connection was left open"
        assert router.process.wait(timeout=SHUTDOWN_S + 10) == 0, router.log()
        print(f"the stream ended {ended:.2f} s after SIGTERM (drain timeout 1 s)")
    finally:
        router.stop()
        backend.close()


def test_what_a_router_ends_at_its_drain_deadline_counts_503_and_ejects_no_backend() -> None:
    """The same, in process, to look at the router's own state: both requests counted 503 (the old code
    counted the stream 200, and the cancelled one 500), and the backend, which did nothing wrong, left in
    rotation (closing its connection to end the stream must not read as its failure)."""
    backend = FakeBackend()
    port = free_port()
    settings = RouterSettings(
        served_model_names=(MODEL,),
        host="127.0.0.1",
        port=port,
        policy="round-robin",
        services={"worker": (backend.address,)},
        refresh_interval=60,
        health_interval=60,
        max_attempts=1,
    )
    router = build(settings, environ={})
    drain = Drain()
    config = server_config(
        DrainMiddleware(build_router_app(router), drain), host="127.0.0.1", port=port, lifespan="on"
    )
    server = DrainingServer(config, drain=drain, timeout=1.0, on_timeout=router.end_in_flight)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        wait_for(lambda: server.started)
        stream = Waiting(url, {"model": MODEL, "prompt": "drip", "stream": True})
        whole = Waiting(url, {"model": MODEL, "prompt": "hang"})
        wait_for(lambda: backend.posts == 2)
        server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
        ended_at_the_deadline(*stream.result())
        assert whole.result()[0] == 503
        thread.join(timeout=SHUTDOWN_S + 10)
        assert not thread.is_alive(), "the router did not exit"
        requests = router.metrics.registry.get_sample_value
        assert requests("kubemoe_router_requests_total", {"endpoint": "/v1/completions", "code": "503"}) == 2
        assert router.metrics.registry.get_sample_value("kubemoe_router_requests_in_flight") == 0
        (worker,) = router.backends.pool("worker").backends.values()
        assert worker.healthy
        assert worker.ejected_at is None
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        backend.close()


def test_a_second_signal_ends_the_drain(gated: GatedStream, tmp_path: Path) -> None:
    router = router_for(gated.address, tmp_path)  # the default drain timeout: minutes
    try:
        held = Held(router.port, "/v1/completions", {"prompt": "p"})
        router.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http_get(f"{router.url}/ready")[0] == 503)
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(timeout=SHUTDOWN_S + 10)
        held.close()
    finally:
        router.stop()
