"""Each role's backends: where they are (DNS, refreshed), whether they answer (health), and ejection.

A role is given as one or more HOST:PORT entries (`--decode-service tiny-moe-decode.ns.svc:8000`, or
`127.0.0.1:8101,127.0.0.1:8102` locally). Every `refresh_s` each HOST is resolved again; its A/AAAA
records are the role's backends (a headless Service answers with its ready pods' IPs), so groups that
scale up or down join and leave the rotation by themselves.

A backend is picked only while healthy. It is ejected at once when a request to it fails at the
transport level (refused, reset) or is answered 503 (loading, failed, terminating; not a busy one's 503
`queue_full`: dispatch.py), and by the health loop when its /ready (or /health, for servers without
/ready, such as vLLM) stops answering 200; the health loop probes every backend each `health_s` and
re-admits one as soon as it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx2

from kubemoe_runtime.router.metrics import RouterMetrics

log = logging.getLogger("kubemoe_runtime.router")
PROBE_TIMEOUT_S = 2.0


@dataclass
class Backend:
    role: str
    address: str  # HOST:PORT as dialled ([v6]:port for IPv6)
    healthy: bool = False
    outstanding: int = 0
    probe_path: str = "/ready"
    ejected_at: float | None = None
    last_error: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def split_hostport(entry: str) -> tuple[str, int]:
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {entry!r}")
    return host.strip("[]"), int(port)


def dial_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class RolePool:
    role: str
    services: list[tuple[str, int]]
    backends: dict[str, Backend] = field(default_factory=dict)

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def set_addresses(self, addresses: set[str]) -> tuple[list[str], list[str]]:
        added = sorted(addresses - set(self.backends))
        removed = sorted(set(self.backends) - addresses)
        for address in added:
            self.backends[address] = Backend(role=self.role, address=address)
        for address in removed:
            del self.backends[address]
        return added, removed


class Backends:
    """Every role's pool, kept current by two background loops (DNS refresh and health probes)."""

    def __init__(
        self,
        services: dict[str, Sequence[str]],
        *,
        metrics: RouterMetrics,
        refresh_s: float = 5.0,
        health_s: float = 1.0,
    ) -> None:
        self.pools = {
            role: RolePool(
                role, [split_hostport(e) for entry in entries for e in entry.split(",") if e.strip()]
            )
            for role, entries in services.items()
        }
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.health_s = health_s
        self._client = httpx2.AsyncClient(timeout=PROBE_TIMEOUT_S)
        self._tasks: list[asyncio.Task[None]] = []

    def pool(self, role: str) -> RolePool:
        return self.pools[role]

    def ready(self) -> bool:
        return all(pool.healthy() for pool in self.pools.values())

    async def start(self) -> None:
        await self.refresh()
        await self.probe_all()
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_s, self.refresh), name="dns-refresh"),
            asyncio.create_task(self._every(self.health_s, self.probe_all), name="health"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _every(self, period: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(period)
            await action()

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        for pool in self.pools.values():
            addresses: set[str] = set()
            resolved_all = True
            for host, port in pool.services:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except socket.gaierror as err:
                    log.warning("router: cannot resolve %s (%s): %s", host, pool.role, err)
                    resolved_all = False
                    continue
                addresses |= {dial_address(str(info[4][0]), port) for info in infos}
            if not resolved_all and not addresses:
                continue  # keep what we had rather than forget every backend on a DNS hiccup
            added, removed = pool.set_addresses(addresses)
            for address in added:
                log.warning("router: %s backend %s joined", pool.role, address)
            for address in removed:
                log.warning("router: %s backend %s left", pool.role, address)
                self.metrics.forget_backend(pool.role, address)
            if added:
                await asyncio.gather(*(self.probe(pool.backends[a]) for a in added))

    async def probe_all(self) -> None:
        await asyncio.gather(
            *(self.probe(b) for pool in self.pools.values() for b in list(pool.backends.values()))
        )

    async def probe(self, backend: Backend) -> None:
        try:
            response = await self._client.get(backend.url + backend.probe_path)
            if response.status_code == 404 and backend.probe_path == "/ready":
                backend.probe_path = "/health"  # e.g. vLLM: /health answers 200 once it serves
                response = await self._client.get(backend.url + backend.probe_path)
        except httpx2.HTTPError as err:
            self._set_health(backend, healthy=False, reason=f"{type(err).__name__}")
            return
        ok = response.status_code == 200
        self._set_health(
            backend, healthy=ok, reason="" if ok else f"{backend.probe_path} {response.status_code}"
        )

    def eject(self, backend: Backend, *, reason: str) -> None:
        """A request to `backend` failed at the transport level: out of rotation until a probe passes."""
        self.count_error(backend, kind=reason)
        self._set_health(backend, healthy=False, reason=reason)

    def count_error(self, backend: Backend, *, kind: str) -> None:
        """kubemoe_router_backend_errors_total, for a backend still in its pool: one that left while a
        request to it or a probe of it was under way has had its series removed, for good."""
        if self._present(backend):
            self.metrics.backend_error(backend.role, backend.address, kind)

    def _present(self, backend: Backend) -> bool:
        pool = self.pools.get(backend.role)
        return pool is not None and pool.backends.get(backend.address) is backend

    def _set_health(self, backend: Backend, *, healthy: bool, reason: str) -> None:
        if backend.healthy and not healthy:
            backend.ejected_at = time.monotonic()
            log.warning("router: ejected %s backend %s (%s)", backend.role, backend.address, reason)
        elif healthy and not backend.healthy and backend.ejected_at is not None:
            log.warning("router: %s backend %s is back", backend.role, backend.address)
        backend.healthy = healthy
        backend.last_error = reason
        if self._present(backend):  # not a series again for one that left (forget_backend)
            self.metrics.backend_healthy.labels(role=backend.role, backend=backend.address).set(
                1 if healthy else 0
            )
