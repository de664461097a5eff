"""The torch engine's API at its drain deadline (pod/drain.py `on_timeout`, serve/in_flight.py): requests
still in flight when --drain-timeout runs out are ended there and then, a whole answer with a 503 (which
the router retries on another backend) and a stream cut without [DONE] (as for a failed engine: the router
ends it with an error event), and the server exits. Before, uvicorn cancelled their handlers SHUTDOWN_S
later: a plain-text 500 "Internal Server Error", and a stream cut the same way but later.

The API is the real one, on a real scheduler over the tiny engine, behind the real DrainMiddleware and
DrainingServer (as pod.py wires them), served by uvicorn on a thread of this process. The scheduler's
engine thread is not started: the requests wait in the scheduler, as behind steps slower than the drain
timeout (which the tiny engine cannot be made to take on demand)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.drain import SHUTDOWN_S, Drain, DrainingServer, DrainMiddleware
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.ports import free_port
from tests.runtime.api_state import MODEL, api_state
from tests.runtime.fake_backend import raw_post

DEADLINE_S = 1.0
BODY = {"model": MODEL, "prompt": "hello experts", "max_tokens": 8, "temperature": 0}


@dataclass
class Draining:
    url: str
    state: ServerState
    server: DrainingServer
    thread: threading.Thread


@pytest.fixture
def draining(qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine) -> Iterator[Draining]:
    state = api_state(engine, tokenizer, qwen)
    drain = Drain()
    port = free_port()
    config = server_config(
        DrainMiddleware(build_app(state), drain), host="127.0.0.1", port=port, lifespan="off"
    )
    server = DrainingServer(config, drain=drain, timeout=DEADLINE_S, on_timeout=state.end_in_flight)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield Draining(url=f"http://127.0.0.1:{port}", state=state, server=server, thread=thread)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert state.scheduler is not None
        state.scheduler.abort_all()  # no engine thread runs: this one may


class Post:
    """A POST on its own thread: its status and (de-chunked) body once the server answered or hung up."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.answer: tuple[int, bytes] | None = None
        self.thread = threading.Thread(target=self._post, args=(url, body), daemon=True)
        self.thread.start()

    def _post(self, url: str, body: dict[str, Any]) -> None:
        self.answer = raw_post(f"{url}/v1/completions", body, timeout=30)

    def result(self) -> tuple[int, bytes]:
        self.thread.join(timeout=30)
        assert self.answer is not None, "no answer"
        return self.answer


def test_requests_left_at_the_drain_deadline_get_a_503_or_a_cut_stream(draining: Draining) -> None:
    whole = Post(draining.url, BODY)
    stream = Post(draining.url, {**BODY, "stream": True})
    deadline = time.monotonic() + 10
    while len(draining.state.in_flight) < 2:  # both submitted: waiting in the scheduler
        assert time.monotonic() < deadline, "the requests were not submitted"
        time.sleep(0.02)

    draining.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
    began = time.monotonic()
    status, body = whole.result()
    answered = time.monotonic() - began
    assert status == 503, body
    error = json.loads(body)["error"]
    assert error["code"] == "engine_failed"
    assert error["type"] == "server_error"
    assert "drain timeout" in error["message"]
    status, body = stream.result()
    assert status == 200  # its headers went out as it began
    assert b"[DONE]" not in body  # cut: not a complete-looking answer
    assert answered < DEADLINE_S + SHUTDOWN_S, f"answered {answered:.1f} s after SIGTERM"

    draining.thread.join(timeout=SHUTDOWN_S + 5)
    assert not draining.thread.is_alive(), "the server did not exit"
    # Another request now (a retry, say) would be refused, not left waiting forever.
    assert draining.state.in_flight.ended is not None
    print(f"the whole answer's 503 came {answered:.2f} s after SIGTERM (drain timeout {DEADLINE_S} s)")


def test_a_drain_with_nothing_left_in_flight_ends_nothing(draining: Draining) -> None:
    draining.server.handle_exit(signal.SIGTERM, None)
    draining.thread.join(timeout=DEADLINE_S + SHUTDOWN_S + 5)
    assert not draining.thread.is_alive()
    assert draining.state.in_flight.ended is None  # idle: the drain ended without the deadline's hook
