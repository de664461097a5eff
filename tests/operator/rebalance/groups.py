"""Stand-ins for a role's group leaders in the rebalancer's unit tests: each answers GET /v1/experts/load
with a load and placement the test sets, and takes POST /v1/experts/placement as the torch engine does
(docs/expert-load.md), switching at once. The engine itself serves these in e2e/test_expert_rebalance.py;
here they let a test set any load and see each request the loop sends."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubemoe_operator.kube.pods import Leader
from kubemoe_operator.plan.experts import default_slots


@dataclass
class Group:
    tokens: list[list[int]]
    ranks: int
    redundant: int = 0
    generation: int = 0
    slots: list[list[int]] = field(default_factory=list)
    posted: list[dict[str, Any]] = field(default_factory=list)
    answer: int = 202
    fail_with: str | None = None
    """Set: the group takes a placement (202) and then gives it up, as the torch engine does when a rank
    fails to load it (placement.error says why; the generation it ran stays)."""
    error: str | None = None
    refuse: str | None = None
    """Set: the group answers a placement POST 400 with this message, as the torch engine does to a
    document that does not fit it (its experts, ranks or layers), and keeps what it runs."""

    def __post_init__(self) -> None:
        if not self.slots:
            n = len(self.tokens[0])
            self.slots = [list(default_slots(n, self.ranks, self.redundant)) for _ in self.tokens]

    def document(self) -> dict[str, Any]:
        n = len(self.tokens[0])
        return {
            "window_seconds": 300,
            "span_seconds": 300,
            "layers": [
                {"layer": i + 1, "tokens": t, "imbalance": 1.0, "slots": s}
                for i, (t, s) in enumerate(zip(self.tokens, self.slots, strict=True))
            ],
            "placement": {
                "ranks": self.ranks,
                "experts_per_rank": n // self.ranks,
                "slots_per_rank": (n + self.redundant) // self.ranks,
                "redundant": self.redundant,
                "generation": self.generation,
                "pending_generation": None,
                "error": self.error,
            },
        }

    def take(self, placement: dict[str, Any]) -> tuple[int, bytes]:
        """The answer to a POST of `placement`: status and body."""
        self.posted.append(placement)
        if self.refuse is not None:
            error = {"message": self.refuse, "type": "invalid_request_error", "param": "layers", "code": None}
            return 400, json.dumps({"error": error}).encode()
        if self.answer == 202 and self.fail_with is not None:
            self.error = (
                f"generation {placement['generation']} was not applied (generation {self.generation} "
                f"stays): {self.fail_with}"
            )
        elif self.answer == 202:
            self.error = None
            self.generation = placement["generation"]
            self.slots = [layer["slots"] for layer in placement["layers"]]
        return self.answer, b""


@contextlib.contextmanager
def serving(groups: Sequence[Group]) -> Iterator[list[Leader]]:
    servers = []
    leaders = []
    try:
        for i, group in enumerate(groups):

            class Handler(BaseHTTPRequestHandler):
                g = group

                def do_GET(self) -> None:
                    body = json.dumps(self.g.document()).encode()
                    self.send_response(200 if self.path == "/v1/experts/load" else 404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def do_POST(self) -> None:
                    raw = self.rfile.read(int(self.headers["Content-Length"]))
                    status, body = self.g.take(json.loads(raw))
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, *args: Any) -> None:
                    pass

            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
            pod = {"metadata": {"name": f"md-decode-{i}"}}
            leaders.append(Leader(pod=pod, url=f"http://127.0.0.1:{server.server_port}/metrics"))
        yield leaders
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
