"""The operator's /healthz and /readyz, served on the event loop from process start.

    GET /healthz   200 while the process's event loop runs (a blocked loop times the probe out)
    GET /readyz    200 while the process is watching: a standby the Lease (its last read of it
                   reached the API server), the leader its resources (kopf's watches started);
                   503 otherwise, with the reason
Leadership is not readiness: a standby is ready, so a rolling update of the operator completes
(the new pod waits as a ready standby, the old one leaves, the new one takes the Lease). Which
replica leads is the metric kubemoe_operator_leader.

A plain asyncio server (no web framework): it answers GET on these two paths and 404 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger("kubemoe.health")

REQUEST_TIMEOUT_S = 5.0


@dataclass
class Health:
    """What the process is doing, as /readyz reports it."""

    leader_election: bool = True
    lease_reachable: bool = False
    """A standby's last attempt at the Lease reached the API server."""
    leading: bool = False
    watching: bool = False
    """kopf has started its watches (the leader, or a process without leader election)."""

    def ready(self) -> tuple[bool, str]:
        if self.watching:
            return True, "watching ModelDeployments and their children"
        if self.leading or not self.leader_election:
            return False, "starting the watches"
        if self.lease_reachable:
            return True, "standby: watching the Lease"
        return False, "standby: the Lease could not be read (API server unreachable or forbidden)"


def _response(status: int, reason: str, body: str) -> bytes:
    data = body.encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


class HealthServer:
    """Serves `health` on `port` until stopped."""

    def __init__(self, health: Health, *, port: int, host: str = "0.0.0.0") -> None:
        self.health = health
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("serving /healthz and /readyz on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def answer(self, method: str, path: str) -> bytes:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", "GET only")
        if path == "/healthz":
            return _response(200, "OK", "ok")
        if path == "/readyz":
            ready, why = self.health.ready()
            return _response(200, "OK", why) if ready else _response(503, "Service Unavailable", why)
        return _response(404, "Not Found", "/healthz or /readyz")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request_line = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: not needed
            if len(request_line) >= 2:
                writer.write(self.answer(request_line[0], request_line[1]))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
