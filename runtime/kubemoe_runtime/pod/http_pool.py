"""The kept-alive connections of the runtime's one HTTP/1.1 client (http_connections.py), per address
(`IdlePool`), and the one rule for a kept-alive connection the server closed while it was idle
(`send_pooled`: one that fails before any byte of its answer, `Stale`, is dropped and the request goes out
on the next, at last on a new one).

Connections are kept alive per address in an `IdlePool`: one goes back once its answer was read to the
end (`give`), and is taken again for the next request (`take`: the newest first, as the likeliest to be
open). At most `max_idle` are kept per address, and none idle for `idle_s` or more (below the servers' own
keep-alive timeout, uvicorn's 5 s, so a server rarely closes one under us): a sweep, at most every
idle_s / 2, closes those and forgets addresses with none left (pods come and go).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

A = TypeVar("A")
C = TypeVar("C")
R = TypeVar("R")

IDLE_S = 4.0


class Stale(ConnectionError):
    """The connection was closed before any byte of the answer came: the server served nothing, so the
    request may go out again on another connection. Its cause is the underlying error."""


class IdlePool(Generic[A, C]):
    def __init__(
        self,
        *,
        max_idle: int,
        close: Callable[[C], None],
        usable: Callable[[C], bool] = lambda _: True,
        idle_s: float = IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._close = close
        self._usable = usable
        self._clock = clock
        self._idle: dict[A, list[tuple[float, C]]] = {}
        self._swept = clock()

    def take(self, address: A) -> C | None:
        """An idle connection to `address` that is still usable, or None."""
        self._sweep()
        idle = self._idle.get(address)
        now = self._clock()
        while idle:
            since, conn = idle.pop()
            if now - since < self.idle_s and self._usable(conn):
                return conn
            self._close(conn)
        return None

    def give(self, address: A, conn: C) -> None:
        """Keep `conn` (its answer read to the end) for the next request to `address`, or close it."""
        self._sweep()
        idle = self._idle.setdefault(address, [])
        if len(idle) < self.max_idle:
            idle.append((self._clock(), conn))
        else:
            self._close(conn)

    def close_all(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, conn in connections:
                self._close(conn)

    def idle(self, address: A) -> int:
        return len(self._idle.get(address, ()))

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._swept < self.idle_s / 2:
            return
        self._swept = now
        for address, idle in list(self._idle.items()):
            fresh = [(since, conn) for since, conn in idle if now - since < self.idle_s]
            for since, conn in idle:
                if now - since >= self.idle_s:
                    self._close(conn)
            if fresh:
                idle[:] = fresh
            else:
                del self._idle[address]


async def send_pooled(
    pool: IdlePool[A, C], address: A, send: Callable[[C], Awaitable[R]], connect: Callable[[], Awaitable[C]]
) -> R:
    """`send` the request on an idle connection to `address`. One that turns out closed before any byte of
    its answer (`send` raises Stale, having closed it) is dropped and the next tried, then a new one, whose
    Stale is the caller's to report. `send` closes its connection on any failure."""
    while (conn := pool.take(address)) is not None:
        with contextlib.suppress(Stale):
            return await send(conn)
    return await send(await connect())
