"""SocketConnection.open (pod/http_connections.py, the KV pull's connection) against a peer whose
connect never completes: a real listening socket with a backlog of 0 and one connection it never
accepts, so the kernel drops the next SYNs, as a black-holed pod address does."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kubemoe_runtime.pod.http_connections import SocketConnection


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = ("127.0.0.1", server.getsockname()[1])
    filler = socket.create_connection(address, timeout=5)  # fills the backlog: it is never accepted
    try:
        yield address
    finally:
        filler.close()
        server.close()


async def test_a_connect_that_never_completes_times_out_and_holds_no_thread(
    black_hole: tuple[str, int],
) -> None:
    """Before, the connect ran in the default thread pool (socket.create_connection): the timeout
    cancelled the wait, not the thread, which stayed blocked for the socket's own timeout; with a few
    such pulls the pool (which tokenizing and chat templates share) stalled every request."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(SocketConnection.open(black_hole, timeout=30.0), timeout=0.3)
    with pytest.raises(TimeoutError):
        await SocketConnection.open(black_hole, timeout=0.3)
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 1), timeout=2.0) == 1  # the pool is free
    assert time.monotonic() - started < 5.0


async def test_a_refused_connect_is_an_oserror_at_once() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = ("127.0.0.1", closed.getsockname()[1])
    closed.close()
    with pytest.raises(ConnectionRefusedError):
        await SocketConnection.open(address, timeout=5.0)
