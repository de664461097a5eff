"""Graceful drain: on SIGTERM a server stops taking work, finishes what it has, then exits.

Kubernetes ends a pod by running its preStop hook (the operator renders a short sleep, so the
endpoints controllers and kube-proxy take the pod out of its Services first), then sending SIGTERM,
then SIGKILL once terminationGracePeriodSeconds have passed since the start (operator
render/lifecycle.py sizes that period to this drain plus margins). On the first SIGTERM or SIGINT,
a `DrainingServer`:

- keeps listening, so that nobody sees a refused connection while answers are still being written;
- answers every new request 503 in OpenAI's error shape (code `draining`, `Connection: close`), and
  /ready 503: the router ejects a backend at once on either (router/backends.py) and retries the
  request elsewhere; /health stays 200 (the process is fine: liveness must not restart it) and
  /metrics stays open;
- lets requests already in flight finish (streams included) and exits once none has been in flight
  for QUIET_S and no prefilled KV waits for its decode, or once --drain-timeout seconds have passed,
  whichever comes first. A prefill's answer leaves KV behind that a decode pulls (GET /v1/kv/...)
  when it gets to it (its queue may hold it a while): those pulls are still served while draining,
  since they finish work already done, not new work, and `Drain.pending` (the torch engine's KV
  store, whose entries expire after their TTL) keeps the pod up until they are taken. QUIET_S covers
  the gap between an answer and its pull;
- at the deadline, with requests still in flight, calls the server's `on_timeout` if it has one, then
  exits: the torch engine's answers each of those requests 503 there and then (a stream is cut as for a
  failed engine), which the router retries elsewhere, and the router's answers its own 503 (a stream
  with an error event and [DONE]: router/in_flight.py), rather than leave uvicorn to cancel them
  SHUTDOWN_S later (a bare 500, a stream cut with no error);
- a second signal skips the rest of the drain (uvicorn then gives connections its own short
  timeout_graceful_shutdown), a third SIGINT forces the exit, as uvicorn does.

A headless pod (ranks only, no API) has no requests of its own and does not drain: it leaves its group
at once (serve.py). A LeaderWorkerSet's workers hang off the leader pod, so a group that goes as a whole
loses its workers once the leader has drained and ended the group; a worker deleted on its own breaks
its group, which should then fail fast (the router ejects it, LeaderWorkerSet recreates it) rather than
keep taking requests it cannot finish. --drain-timeout defaults to $KUBEMOE_DRAIN_TIMEOUT_S (the
operator sets it on every pod that drains: the router's, the torch engine's API-serving pods), else
DRAIN_TIMEOUT_S.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Final

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from kubemoe_runtime.pod.api_error import ApiError

log = logging.getLogger("kubemoe_runtime.drain")

DRAIN_TIMEOUT_S: Final = 120.0
"""How long in-flight requests may take to finish after SIGTERM: a few thousand tokens at tens of
tokens a second. The operator's DRAIN_TIMEOUT_S (render/lifecycle.py) is the same number."""
DRAIN_TIMEOUT_ENV: Final = "KUBEMOE_DRAIN_TIMEOUT_S"
QUIET_S: Final = 1.0
"""Idle this long while draining, and the server exits (see the module docstring)."""
SHUTDOWN_S: Final = 5
"""uvicorn's own timeout_graceful_shutdown, after the drain: closing idle connections, or (after a
second signal or the drain timeout) how long what is left may still run before it is cancelled."""
OPEN_PATHS: Final = frozenset({"/health", "/metrics"})
"""Answered as usual while draining, and never counted as in flight (probes and scrapes)."""
READY_PATH: Final = "/ready"
KV_PULL_PREFIX: Final = "/v1/kv/"


def drain_timeout_default(environ: Mapping[str, str] | None = None) -> float:
    """$KUBEMOE_DRAIN_TIMEOUT_S if it is a number >= 0, else DRAIN_TIMEOUT_S."""
    raw = (os.environ if environ is None else environ).get(DRAIN_TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DRAIN_TIMEOUT_S
    return value if math.isfinite(value) and value >= 0 else DRAIN_TIMEOUT_S


class Drain:
    """Whether the server is draining, and how many requests are in flight."""

    def __init__(self, *, quiet_s: float = QUIET_S, pending: Callable[[], int] = lambda: 0) -> None:
        self.quiet_s = quiet_s
        self.pending = pending
        """Work left besides requests in flight (prefilled KV not yet pulled): the drain waits for it."""
        self.draining = False
        self.in_flight = 0
        self.deadline: float | None = None
        self._idle_since = time.monotonic()

    def begin(self, timeout: float) -> None:
        """Start draining (safe to call from a signal handler: it only sets attributes)."""
        if not self.draining:
            self.deadline = time.monotonic() + timeout
            self.draining = True

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle_since = time.monotonic()

    def done(self, now: float | None = None) -> bool:
        """Draining, and either the deadline has passed or nothing has been in flight for quiet_s and
        nothing is pending."""
        if not self.draining:
            return False
        now = time.monotonic() if now is None else now
        if self.deadline is not None and now >= self.deadline:
            return True
        return self.in_flight == 0 and now - self._idle_since >= self.quiet_s and self.pending() == 0


_DRAINING_BODY: Final = json.dumps(
    ApiError(503, "the server is shutting down", type="server_error", code="draining").body()
).encode()


class DrainMiddleware:
    """ASGI middleware: counts requests in flight; while draining, refuses new ones (503) and /ready."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining and (path == READY_PATH or not path.startswith(KV_PULL_PREFIX)):
            await _refuse(send, ready=path == READY_PATH)
            return
        if path == READY_PATH:
            await self.app(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


async def _refuse(send: Send, *, ready: bool) -> None:
    body, kind = (
        (b"draining", b"text/plain; charset=utf-8") if ready else (_DRAINING_BODY, b"application/json")
    )
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"retry-after", b"1"),  # another pod (through the router or Service) can take it now
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT starts a drain (`Drain`) instead of the shutdown; the server
    shuts down once the drain is done. A drain timeout of 0 keeps uvicorn's own behaviour."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Drain,
        timeout: float,
        on_timeout: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = timeout
        self.on_timeout = on_timeout
        """Called on the event loop at the drain deadline, while requests are still in flight: it ends
        them (the server then exits, giving their answers up to SHUTDOWN_S to go out)."""
        self._announced = False
        self._timed_out = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.should_exit or self.drain_timeout <= 0:
            super().handle_exit(sig, frame)  # a second signal: no more waiting
            return
        self.drain.begin(self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self._announced:  # logged here: not from the signal handler
            self._announced = True
            log.warning(
                "kubemoe-runtime: draining: %d request(s) in flight, %d prefilled KV waiting for its pull; "
                "new requests get 503; exiting when done or in %.0fs",
                self.drain.in_flight,
                self.drain.pending(),
                self.drain_timeout,
            )
        if self.drain.done():
            if self.drain.in_flight and not self._timed_out:
                self._timed_out = True
                log.warning(
                    "kubemoe-runtime: drain timeout: %d request(s) still in flight", self.drain.in_flight
                )
                if self.on_timeout is not None:
                    try:
                        self.on_timeout()
                    except Exception:  # the server exits all the same
                        log.exception("kubemoe-runtime: ending the requests in flight failed")
            self.should_exit = True
        return await super().on_tick(counter)
