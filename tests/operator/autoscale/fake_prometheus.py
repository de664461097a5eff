"""A Prometheus HTTP API on localhost (http.server in a thread): `/api/v1/query` answers each query with
what the test's `answer(query)` returns, as an instant vector, and keeps every query it was asked."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[str], list[tuple[dict[str, str], str]]]
"""query -> its samples: (labels, value as Prometheus writes it: "0.5", "NaN")."""


@dataclass
class FakePrometheus:
    url: str
    answer: Answer
    queries: list[str] = field(default_factory=list)
    dribble: bool = False
    """Answer one byte a second (a Prometheus behind a stalled proxy)."""


def _vector(samples: list[tuple[dict[str, str], str]]) -> bytes:
    result = [{"metric": labels, "value": [1764400000.0, value]} for labels, value in samples]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


@contextlib.contextmanager
def fake_prometheus(answer: Answer) -> Iterator[FakePrometheus]:
    state: list[FakePrometheus] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            prom = state[0]
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["query"][0]
            prom.queries.append(query)
            body = _vector(prom.answer(query))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):
                if not prom.dribble:
                    self.wfile.write(body)
                    return
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1.0)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.append(FakePrometheus(url=f"http://127.0.0.1:{server.server_address[1]}", answer=answer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
