"""The router's HTTP/1.1 client to the engines: kept-alive connections per backend, one write a request.

All the router asks of a client: send a request (mostly a POST of a JSON body), read the status and
headers, then the body whole or as it arrives (Content-Length, chunked, or up to the close). httpx2
(httpcore2, anyio and h11 under it) did that for about 0.9 ms of CPU a request on a 2-core box, two
thirds of the router's own work (bench/bench_router.py); on asyncio streams it is a small part of that.

Why not aiohttp's ClientSession (3.14.5; one session, a TCPConnector with no limit and a 4 s keep-alive,
no decompression, a dummy cookie jar, the same retry of a request whose kept-alive connection was found
closed): measured against this client with bench_router.py's rows, both routers over the same echo
backend and the direct calls interleaved in one run, two runs, uvicorn on httptools and uvloop, 2 cores:

    row                      added p50 (ms)          router CPU per request (us)
                             this client   aiohttp   this client   aiohttp
    1 stream, 74 B           0.33-0.39     0.52-0.56   289-356      483-528
    1 stream, 100 KB         0.51          0.71-0.72   444-489      644-700
    64 streams held 100 ms   0.54-0.82     0.65-1.45   475-768      651-1029
    64 streams held 500 ms   0.46-0.86     0.80-1.21   599-898      872-1328

aiohttp adds 0.1-0.5 ms at p50 (0.17-0.21 ms on the one-stream rows) and 175-430 us of CPU a request
(+40-60%, so that much less capacity per core); in 4 of the 6 held-row measurements its added p99 was
38-99 ms where this client's stayed under 1.4 ms (the other two, 74 B held 100 ms, were noise for both,
on a box shared with other work). In-process, aiohttp's `_request` alone costs about 2.5x this client's
CPU a request. So this client stays.

The HTTP/1.1 itself (the request's head, the answer's head and framing, the kept-alive connections, the
retry of a request whose kept-alive connection the backend had closed) is pod/http_connections.py's
(with pod/http_heads.py and pod/http_pool.py), shared with the decode's KV pull; this module keeps what is
the router's: its timeouts and deadline, and its errors. A connection goes back to its backend's idle list
only once its answer was read to the end. An idle connection the backend has since closed is dropped when
taken; if a kept-alive connection fails before any byte of an answer (the backend closed it as the request
went out), the request is sent once more on another connection. Every other failure is an
`UpstreamError`, which the router treats as the backend's.

Every read is bounded: by `read_timeout` (the most seconds a backend may send nothing: the head of a
non-streaming answer comes only once it is generated) and by the request's deadline, if it has one.
Either is an `UpstreamTimeout`, which is not the backend's fault as such (a hung backend fails its health
probe). A connection whose answer was not read to its end, for whatever reason (a cancelled request
included), is closed, so the backend sees its client go. The router may end an answer itself while it is
read (`UpstreamResponse.end`: its drain deadline), closing the connection: the read then fails with
`UpstreamEnded`, which is not the backend's fault either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

from kubemoe_runtime.pod.http_connections import StreamConnection
from kubemoe_runtime.pod.http_heads import ResponseHead, request_head
from kubemoe_runtime.pod.http_pool import IdlePool, Stale, send_pooled

READ_TIMEOUT_S = 600.0
_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
T = TypeVar("T")


class UpstreamError(Exception):
    """The backend could not be reached, or broke the connection before its answer was complete."""

    @property
    def kind(self) -> str:
        """What went wrong, for metrics: the underlying error's type (ConnectionRefusedError, ...)."""
        return type(self.__cause__ or self).__name__


class UpstreamTimeout(Exception):
    """The backend sent nothing for the read timeout, or the request's deadline passed."""


class UpstreamEnded(Exception):
    """The router itself ended the answer before it was read to its end (`UpstreamResponse.end`)."""


async def _bounded(read: Awaitable[T], *, read_timeout: float, deadline: float | None) -> T:
    """`read`, within `read_timeout` seconds and before `deadline` (the event loop's clock)."""
    limit = read_timeout
    if deadline is not None:
        limit = min(limit, deadline - asyncio.get_running_loop().time())
    try:
        async with asyncio.timeout(limit):
            return await read
    except TimeoutError as err:
        if limit < read_timeout:
            raise UpstreamTimeout("the request's deadline passed before the backend answered") from err
        raise UpstreamTimeout(f"the backend sent nothing for {read_timeout:g} s") from err


class UpstreamResponse:
    def __init__(
        self,
        pool: Upstream,
        address: str,
        conn: StreamConnection,
        head: ResponseHead,
        *,
        deadline: float | None,
    ) -> None:
        self._pool, self._address, self._conn = pool, address, conn
        self._deadline = deadline
        self._to_close = head.content_length is None and not head.chunked  # a body that ends at the close
        self._ended = False
        self.status = head.status
        self.headers = head.headers

    def _bounded(self, read: Awaitable[T]) -> Awaitable[T]:
        return _bounded(read, read_timeout=self._pool.read_timeout, deadline=self._deadline)

    async def read(self) -> bytes:
        """The whole body."""
        if self._conn.sized:
            try:
                return await self._bounded(self._conn.read_rest())
            except _ERRORS as err:
                raise UpstreamError(f"answer cut short: {type(err).__name__}") from err
        return b"".join([chunk async for chunk in self.iter_raw()])

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked framing removed); UpstreamEnded once `end` cut it short."""
        conn = self._conn
        try:
            while chunk := await self._bounded(conn.read_piece()):
                yield chunk
        except _ERRORS as err:
            if self._ended:
                raise UpstreamEnded("the router ended the answer") from err
            raise UpstreamError(f"answer cut short: {type(err).__name__}: {err}") from err
        if self._ended and self._to_close:  # its end was the router's close, not the backend's
            raise UpstreamEnded("the router ended the answer")

    def end(self) -> None:
        """End the answer now, mid-body, and close the connection (the backend sees its client go): a read
        waiting on it, or the next one, fails with UpstreamEnded (what was already received comes first)."""
        self._ended = True
        self._conn.close()

    async def aclose(self) -> None:
        """Give the connection back if the answer was read to its end, else close it."""
        if self._conn.reusable and not self._ended:
            self._pool.release(self._address, self._conn)
        else:
            self._conn.close()


class Upstream:
    def __init__(
        self, *, connect_timeout: float = 5.0, read_timeout: float = READ_TIMEOUT_S, max_idle: int = 256
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: IdlePool[str, StreamConnection] = IdlePool(
            max_idle=max_idle, close=StreamConnection.close, usable=StreamConnection.usable
        )

    async def post(
        self,
        address: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """Send the request and read the answer's status and headers; the body is the caller's to read
        (the same deadline, on the event loop's clock, bounds it)."""
        return await self.request("POST", address, path, body, headers, deadline=deadline)

    async def request(
        self,
        method: str,
        address: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """`post` with any method but HEAD (whose answer has no body to read), to `target` (a path and
        query); a GET or DELETE without a body goes out without a Content-Length."""
        if method == "HEAD":
            raise ValueError("HEAD is not sent upstream: its answer's framing describes no body")
        length = None if not body and method in ("GET", "DELETE") else len(body)
        request = request_head(method, target, host=address, fields=headers, body_length=length) + body

        async def send(conn: StreamConnection) -> UpstreamResponse:
            try:
                head = await _bounded(
                    conn.exchange(request), read_timeout=self.read_timeout, deadline=deadline
                )
            except Stale:
                raise  # closed by the backend while idle: no answer, nothing done; send_pooled tries another
            except _ERRORS as err:
                raise UpstreamError(f"{type(err).__name__}: {err}") from err
            return UpstreamResponse(self, address, conn, head, deadline=deadline)

        try:
            return await send_pooled(self._idle, address, send, lambda: self._connect(address))
        except Stale as err:  # a new connection, closed before any answer
            cause = err.__cause__ or err
            raise UpstreamError(f"{type(cause).__name__}: {cause}") from cause

    async def _connect(self, address: str) -> StreamConnection:
        host, _, port = address.rpartition(":")
        try:
            return await asyncio.wait_for(
                StreamConnection.open(host.strip("[]"), int(port)), self.connect_timeout
            )
        except (OSError, TimeoutError) as err:
            raise UpstreamError(f"connect: {type(err).__name__}: {err}") from err

    def release(self, address: str, conn: StreamConnection) -> None:
        self._idle.give(address, conn)

    async def aclose(self) -> None:
        self._idle.close_all()
