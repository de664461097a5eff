"""The runtime's one HTTP/1.1 client: the router's requests to the engines (router/upstream.py) and the
decode's GET of a prefill's KV (engines/torch/serve/kv/pull.py).

What both share is here once: the request's head (`request_head`), the answer's head parsed and checked
(`parse_head`: the status line, the fields, the framing from Content-Length or Transfer-Encoding, whether
the connection stays open), the kept-alive connections per address (`IdlePool`), and the one rule for a
kept-alive connection the server closed while it was idle (`send_pooled`: one that fails before any byte
of its answer, `Stale`, is dropped and the request goes out on the next, at last on a new one). What is
the caller's stays with it: the router's timeouts, deadline and error kinds; the KV pull's checks of its
target, its signature and its size caps.

Two transports, one per way of reading a body, because neither serves the other's reader without a cost:

- `StreamConnection` (asyncio streams), for the router: a body read as it arrives, piece by piece (SSE
  passes through), a whole small body in one read. The transport keeps the socket registered with the
  event loop and reads ahead into the stream reader's buffer, which pauses the socket when the router's
  own client reads slowly. Measured against aiohttp and httpx2 (router/upstream.py's docstring).
- `SocketConnection` (a plain non-blocking socket and `loop.sock_recv_into`), for the KV pull: a body of
  up to gigabytes read straight into one buffer of its Content-Length, the kernel's copy the only one (a
  stream reader copies every byte twice: into its own buffer, then out as a new bytes object). A socket is
  bound to no event loop, so one puller serves any loop it is awaited on. Measured against http.client in
  a thread (kv/pull.py's docstring).

One `asyncio.BufferedProtocol` could do both (hand the transport the caller's buffer for the KV body, its
own for pieces), but it would rewrite the stream reader's buffering, EOF and pause/resume in Python, for no
measured gain on either path, and tie the KV pull's connections to one loop.

Connections are kept alive per address in an `IdlePool`: one goes back once its answer was read to the
end (`give`), and is taken again for the next request (`take`: the newest first, as the likeliest to be
open). At most `max_idle` are kept per address, and none idle for `idle_s` or more (below the servers' own
keep-alive timeout, uvicorn's 5 s, so a server rarely closes one under us): a sweep, at most every
idle_s / 2, closes those and forgets addresses with none left (pods come and go).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

A = TypeVar("A")
C = TypeVar("C")
R = TypeVar("R")

IDLE_S = 4.0
MAX_HEAD_BYTES = 64 << 10  # an answer's head, its blank line included
MAX_LENGTH_DIGITS = 18  # a Content-Length or chunk size past 10**18 bytes is no length at all
READ_BYTES = 1 << 16  # a streamed body's pieces, at most
NO_BODY = frozenset({204, 304})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a field name (RFC 9110 5.1)


class HeadError(ValueError):
    """An answer's head (or a chunk's framing) that is not well-formed HTTP/1.1, or a body past its frame."""


class Stale(ConnectionError):
    """The connection was closed before any byte of the answer came: the server served nothing, so the
    request may go out again on another connection. Its cause is the underlying error."""


# --- the heads ---------------------------------------------------------------------------------------


def request_head(
    method: str, target: str, *, host: str, fields: Mapping[str, str] | None = None, body_length: int | None
) -> bytes:
    """An HTTP/1.1 request's head; a Content-Length unless `body_length` is None. ValueError if a part
    holds a line break (the head is the server's to parse: no caller's value may add a line to it)."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    if body_length is not None:
        lines.append(f"content-length: {body_length}")
    if fields:
        lines += [f"{name}: {value}" for name, value in fields.items()]
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError(f"a line break inside the request's head: {text[:200]!r}")
    return (text + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """An answer's head, checked. `headers`: lower-cased names, a repeated field's values joined by ", "."""

    status: int
    headers: dict[str, str]
    content_length: int | None  # None: chunked, or up to the close
    chunked: bool
    keep_alive: bool  # HTTP/1.1, no Connection: close, and the body's end known without the close

    def length(self, limit: int) -> int:
        """The body's Content-Length, at most `limit`; HeadError if the body is framed otherwise."""
        if (te := self.headers.get("transfer-encoding")) is not None:
            raise HeadError(f"Transfer-Encoding {te}, not a Content-Length")
        if self.content_length is None:
            raise HeadError("no Content-Length")
        if self.content_length > limit:
            raise HeadError(f"Content-Length {self.content_length} is above {limit}")
        return self.content_length


def parse_head(head: bytes) -> ResponseHead:
    """The head of an HTTP/1.x answer, up to its blank line (included or not); HeadError unless it is one."""
    if len(head) > MAX_HEAD_BYTES:
        raise HeadError(f"a head of {len(head)} bytes, above {MAX_HEAD_BYTES}")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or not (code.isascii() and code.isdigit() and code[0] != "0")
        or rest[3:4] not in ("", " ")
    ):
        raise HeadError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or "\n" in value or "\r" in value:
            raise HeadError(f"not a header field (a name, a colon, a value): {line[:80]!r}")
        key, value = name.lower(), value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    content_length: int | None = None
    if (te := headers.get("transfer-encoding")) is not None:
        chunked = te.rpartition(",")[2].strip(" \t").lower() == "chunked"  # else: up to the close
    else:
        chunked = False
        if (field := headers.get("content-length")) is not None:
            content_length = _length(field)
    if status in NO_BODY or 100 <= status < 200:
        content_length, chunked = 0, False
    keep_alive = (
        version == "HTTP/1.1"
        and "close" not in (token.strip(" \t") for token in headers.get("connection", "").lower().split(","))
        and (chunked or content_length is not None)
    )
    return ResponseHead(status, headers, content_length, chunked, keep_alive)


def _length(field: str) -> int:
    """A Content-Length field's one value (a list of equal values is that value: RFC 9110 8.6)."""
    values = {value.strip(" \t") for value in field.split(",")}
    if len(values) != 1 or not _is_decimal(value := values.pop()):
        raise HeadError(f"Content-Length {field[:80]!r} is not one length")
    return int(value)


def _is_decimal(text: str) -> bool:
    return 0 < len(text) <= MAX_LENGTH_DIGITS and text.isascii() and text.isdigit()


def _chunk_size(line: bytes) -> int:
    """A chunk's size line (extensions dropped)."""
    size = line[:-2].partition(b";")[0].strip(b" \t")
    if not 0 < len(size) <= MAX_LENGTH_DIGITS - 3 or size.strip(b"0123456789abcdefABCDEF"):
        raise HeadError(f"not a chunk size: {line[:40]!r}")
    return int(size, 16)


# --- the pool ----------------------------------------------------------------------------------------


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


# --- the transports ----------------------------------------------------------------------------------


class StreamConnection:
    """A connection on asyncio streams, for a body read as it arrives (the router's)."""

    __slots__ = ("_done", "_head", "_remaining", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._head: ResponseHead | None = None
        self._remaining: int | None = None
        self._done = False

    @classmethod
    async def open(cls, host: str, port: int) -> StreamConnection:
        return cls(*await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES))

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()

    @property
    def reusable(self) -> bool:
        """The answer was read to its end, and the server keeps the connection open."""
        return self._done and self._head is not None and self._head.keep_alive

    @property
    def sized(self) -> bool:
        """The body's end is its Content-Length (so `read_rest` takes it in one read)."""
        return self._head is not None and not self._head.chunked and self._remaining is not None

    async def exchange(self, request: bytes) -> ResponseHead:
        """Send `request`, then read the answer's head. Stale if the connection closes before any byte of
        it (a reset counts: the stream reader does not say whether bytes came first). The connection is
        closed on any failure, a cancellation included, so that the server sees its client go."""
        try:
            self.writer.write(request)
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    raise
                raise Stale("closed before any byte of the answer") from err
            except (ConnectionResetError, BrokenPipeError) as err:
                raise Stale(f"{type(err).__name__}: {err}") from err
            head = parse_head(raw)
        except BaseException:
            self.close()
            raise
        self._head, self._remaining, self._done = head, head.content_length, head.content_length == 0
        return head

    async def read_rest(self) -> bytes:
        """The rest of a body of known length (`sized`), in one read."""
        data = await self.reader.readexactly(self._remaining or 0)
        self._remaining, self._done = 0, True
        return data

    async def read_piece(self) -> bytes:
        """The body's next piece as it arrives (the chunked framing removed); b"" once read to its end."""
        if self._done:
            return b""
        reader = self.reader
        if self._head is not None and self._head.chunked:
            if size := _chunk_size(await reader.readuntil(b"\r\n")):
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise HeadError("a chunk longer than its size")
                return data[:-2]
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
        elif self._remaining is not None:
            if self._remaining:
                if not (piece := await reader.read(min(self._remaining, READ_BYTES))):
                    raise EOFError("closed before the end of the body")
                self._remaining -= len(piece)
                return piece
        elif piece := await reader.read(READ_BYTES):
            return piece  # up to the close
        self._done = True
        return b""


class SocketConnection:
    """A plain non-blocking socket, for a body read into one buffer of its Content-Length (the KV pull's).
    Bound to no event loop: any loop it is awaited on serves it."""

    __slots__ = ("_rest", "sock")

    HEAD_READ_BYTES = 64 << 10  # the first read: the head, and the start of the body with it

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rest = bytearray()

    @classmethod
    async def open(cls, address: tuple[str, int], *, timeout: float) -> SocketConnection:
        # resolution and connect in a thread: rare, as connections are reused
        sock = await asyncio.to_thread(socket.create_connection, address, timeout)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def usable(self) -> bool:
        """Still open, with nothing unasked for to read (one non-blocking peek)."""
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)  # b"": closed by the server
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()

    async def exchange(self, request: bytes) -> ResponseHead:
        """Send `request`, then read the answer's head (and whatever of the body came with it). Stale if
        the connection closes before any byte of it; the connection is closed on any failure."""
        loop = asyncio.get_running_loop()
        head = bytearray()
        try:
            try:
                await loop.sock_sendall(self.sock, request)
                while (end := head.find(b"\r\n\r\n")) < 0:
                    if len(head) >= MAX_HEAD_BYTES:
                        raise HeadError(f"no end of the answer's head in {len(head)} bytes")
                    if not (chunk := await loop.sock_recv(self.sock, self.HEAD_READ_BYTES)):
                        raise EOFError("closed by the server")
                    head += chunk
            except (OSError, EOFError) as err:
                if not head:
                    raise Stale(f"{type(err).__name__}: {err}") from err
                raise
            parsed = parse_head(bytes(head[:end]))
        except BaseException:
            self.close()
            raise
        self._rest = head[end + 4 :]
        return parsed

    async def read_into(self, length: int) -> bytearray:
        """The body, `length` bytes (its checked Content-Length), in one new buffer: the kernel's copy into
        it is the only one. The connection is closed on any failure."""
        loop = asyncio.get_running_loop()
        try:
            start, self._rest = self._rest, bytearray()
            if len(start) > length:
                raise HeadError(f"{len(start) - length} bytes past the Content-Length")
            data = bytearray(length)
            view = memoryview(data)
            got = len(start)
            view[:got] = start
            while got < length:
                if not (n := await loop.sock_recv_into(self.sock, view[got:])):
                    raise EOFError(f"the body ends after {got} of {length} bytes")
                got += n
        except BaseException:
            self.close()
            raise
        return data
