"""The runtime's one HTTP/1.1 client: the router's requests to the engines (router/upstream.py) and the
decode's GET of a prefill's KV (engines/torch/serve/kv/pull.py).

What both share is kept once: the request's head and the answer's head parsed and checked (http_heads.py),
the kept-alive connections per address and the one rule for a kept-alive connection the server closed
while it was idle (http_pool.py). What is the caller's stays with it: the router's timeouts, deadline and
error kinds; the KV pull's checks of its target, its signature and its size caps. Here: the connections.

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
"""

from __future__ import annotations

import asyncio
import socket

from kubemoe_runtime.pod.http_heads import (
    MAX_HEAD_BYTES,
    MAX_LENGTH_DIGITS,
    HeadError,
    ResponseHead,
    parse_head,
)
from kubemoe_runtime.pod.http_pool import Stale

READ_BYTES = 1 << 16  # a streamed body's pieces, at most


def _chunk_size(line: bytes) -> int:
    """A chunk's size line (extensions dropped)."""
    size = line[:-2].partition(b";")[0].strip(b" \t")
    if not 0 < len(size) <= MAX_LENGTH_DIGITS - 3 or size.strip(b"0123456789abcdefABCDEF"):
        raise HeadError(f"not a chunk size: {line[:40]!r}")
    return int(size, 16)


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
        """Connected to `address` within `timeout` (TimeoutError past it), on the event loop: a connect
        in a thread (socket.create_connection) could not be cancelled, and each one to a peer that never
        answers held a thread of the default pool, which tokenizing and chat templates share, for the
        whole timeout."""
        loop = asyncio.get_running_loop()
        failed: OSError | None = None
        async with asyncio.timeout(timeout):
            found = await loop.getaddrinfo(*address, type=socket.SOCK_STREAM)
            for family, kind, proto, _, where in found:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, where)
                except OSError as err:
                    sock.close()
                    failed = err
                    continue
                except BaseException:  # cancelled, or the timeout
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return cls(sock)
        raise failed or OSError(f"no address for {address[0]}")

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
