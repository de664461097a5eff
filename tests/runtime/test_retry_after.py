"""Refusals worth retrying soon carry a Retry-After header, so a client (the OpenAI SDK honours it) waits
that long instead of guessing: the torch engine's `queue_full`, a draining pod's `draining`, the router's
`no_backend`, and a backend's own hint relayed by the router when every backend refused.

Real parts: the torch API on a real scheduler (tests/runtime/api_state.py) served by uvicorn, pod/drain.py's
middleware on a real app, the router process. The busy backend is tests/runtime/fake_backend.py (a real
engine cannot be made to answer 503 with a given Retry-After on demand)."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import build_app
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.drain import Drain, DrainMiddleware
from tests.runtime.api_state import MODEL, api_state, engine_thread
from tests.runtime.app_thread import serving
from tests.runtime.fake_backend import FakeBackend
from tests.runtime.test_router_faults import router_for


def post(
    port: int, path: str, body: dict[str, Any], *, timeout: float = 30
) -> tuple[int, dict[str, str], Any]:
    """POST `body` as JSON; the status, the headers (lower-cased names) and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)
    finally:
        conn.close()


def test_a_full_queue_says_when_to_retry(qwen: Path, engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    state = api_state(engine, tokenizer, qwen, max_waiting=1)  # no engine thread yet: the first one waits
    body = {"model": MODEL, "prompt": "hello experts", "max_tokens": 2, "temperature": 0}
    with serving(build_app(state), lifespan="off") as port:
        first: list[int] = []
        waiting = threading.Thread(target=lambda: first.append(post(port, "/v1/completions", body)[0]))
        waiting.start()
        assert state.scheduler is not None
        while not state.scheduler.has_work():  # the first request is queued
            waiting.join(timeout=0.05)
        status, headers, answer = post(port, "/v1/completions", body)
        assert status == 503, answer
        assert answer["error"]["code"] == "queue_full"
        assert headers.get("retry-after") == "1"
        with engine_thread(state):  # the queued one is served, and was not harmed
            waiting.join(timeout=60)
        assert first == [200]


def test_a_draining_pod_says_when_to_retry() -> None:
    drain = Drain(quiet_s=0)
    answer_x = Route("/v1/completions", lambda _: PlainTextResponse("x"), methods=["POST"])
    app = DrainMiddleware(Starlette(routes=[answer_x]), drain)
    with serving(app, lifespan="off") as port:
        assert post_status(port) == 200
        drain.begin(timeout=60)
        status, headers, answer = post(port, "/v1/completions", {"model": MODEL, "prompt": "p"})
        assert status == 503
        assert answer["error"]["code"] == "draining"
        assert headers.get("retry-after") == "1"


def post_status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/completions", b"{}")
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_router_relays_a_busy_backends_hint_then_gives_its_own(tmp_path: Path) -> None:
    busy = FakeBackend(post_status=503, retry_after="7")
    router = router_for(busy, log_dir=tmp_path, name="busy", extra=("--health-interval", "60"))
    try:
        status, headers, answer = post(router.port, "/v1/completions", {"model": "m", "prompt": "p"})
        assert status == 503, answer
        assert headers.get("retry-after") == "7"  # the only backend's own hint
        # That 503 ejected it until a health probe passes (60 s here): no backend is left to try.
        status, headers, answer = post(router.port, "/v1/completions", {"model": "m", "prompt": "p"})
        assert status == 503, answer
        assert answer["error"]["code"] == "no_backend"
        assert headers.get("retry-after") == "1"
    finally:
        router.stop()
        busy.close()
