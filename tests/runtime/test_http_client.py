"""The HTTP/1.1 client the router and the KV pull share (pod/http_client.py): the answer's head parser on
hostile input, the request's head, both transports against a server that sends canned bytes, the retry of
a stale kept-alive connection, and the kept-alive pool on a fake clock."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from kubemoe_runtime.pod.http_connections import SocketConnection, StreamConnection
from kubemoe_runtime.pod.http_heads import MAX_HEAD_BYTES, HeadError, parse_head, request_head
from kubemoe_runtime.pod.http_pool import IdlePool, Stale, send_pooled

# --- the answer's head -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"HTTP/1.1 OK\r\n\r\n", "not an HTTP/1.x answer"),  # a status line without a code
        (b"HTTP/1.1\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n", "not an HTTP/1.x answer"),  # superscript digits in latin-1
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length 5\r\n\r\n", "not a header field"),  # no colon
        (b"HTTP/1.1 200 OK\r\nx-no-value\r\n\r\n", "not a header field"),  # no colon, a name alone
        (b"HTTP/1.1 200 OK\r\n: 5\r\n\r\n", "not a header field"),  # no name
        (b"HTTP/1.1 200 OK\r\ncontent-length : 5\r\n\r\n", "not a header field"),  # space before the colon
        (b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n", "not a header field"),  # obsolete line folding
        (b"HTTP/1.1 200 OK\r\nx-a: 1\nx-b: 2\r\n\r\n", "not a header field"),  # a bare LF inside a line
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 19 + b"\r\n\r\n", "is not one length"),  # huge
        (b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", "above 65536"),  # too long
    ],
)
def test_a_malformed_head_is_refused(head: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        parse_head(head)


def test_a_head_is_parsed_with_its_framing_and_keep_alive() -> None:
    head = parse_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 7\r\n\r\n"
    )
    assert (head.status, head.content_length, head.chunked, head.keep_alive) == (200, 7, False, True)
    assert head.headers == {"content-type": "text/plain", "x-a": "1, 2", "content-length": "7"}
    assert head.length(7) == 7
    with pytest.raises(HeadError, match="Content-Length 7 is above 6"):
        head.length(6)
    # the same length twice is that length (RFC 9110 8.6); a reason phrase may be missing
    assert (
        parse_head(b"HTTP/1.1 200\r\ncontent-length: 5\r\ncontent-length: 5, 5\r\n\r\n").content_length == 5
    )
    chunked = parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n")
    assert (chunked.content_length, chunked.chunked, chunked.keep_alive) == (None, True, True)
    with pytest.raises(HeadError, match="Transfer-Encoding gzip, chunked, not a Content-Length"):
        chunked.length(100)
    with pytest.raises(HeadError, match="no Content-Length"):
        parse_head(b"HTTP/1.1 200 OK\r\n\r\n").length(100)
    assert parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").content_length == 0


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive, Close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n\r\n", False),  # the body ends with the connection
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", False),  # so does this one
    ],
)
def test_a_connection_is_kept_only_when_the_server_keeps_it_and_the_body_has_an_end(
    head: bytes, keep_alive: bool
) -> None:
    assert parse_head(head).keep_alive is keep_alive


def test_the_request_head_has_its_length_and_no_smuggled_line() -> None:
    assert request_head("POST", "/v1/x", host="b:1", fields={"x-id": "7"}, body_length=3) == (
        b"POST /v1/x HTTP/1.1\r\nhost: b:1\r\ncontent-length: 3\r\nx-id: 7\r\n\r\n"
    )
    assert (
        request_head("GET", "/kv", host="b:1", body_length=None) == b"GET /kv HTTP/1.1\r\nhost: b:1\r\n\r\n"
    )
    for fields in ({"x-id": "7\r\nx-admin: 1"}, {"x-id": "7\nx-admin: 1"}, {"x-id\r": "7"}):
        with pytest.raises(ValueError, match="a line break inside the request's head"):
            request_head("POST", "/v1/x", host="b:1", fields=fields, body_length=0)


# --- both transports against canned answers ----------------------------------------------------------


class Canned:
    """A TCP server that answers each request (read up to its blank line) with the next canned bytes; a
    None closes the connection instead of an answer, or right after the answer before it. Counts
    connections."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while self.answers:
                while b"\r\n\r\n" not in request:
                    if not (data := conn.recv(65536)):
                        return
                    request += data
                request = request.partition(b"\r\n\r\n")[2]
                if (answer := self.answers.pop(0)) is None:
                    return
                conn.sendall(answer)
                if self.answers and self.answers[0] is None:  # close right after this answer
                    self.answers.pop(0)
                    return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def canned() -> Iterator[Callable[[list[bytes | None]], Canned]]:
    servers: list[Canned] = []

    def make(answers: list[bytes | None]) -> Canned:
        servers.append(Canned(answers))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


def stream_body(port: int, *, sized: bool = False) -> tuple[bytes, bool]:
    async def go() -> tuple[bytes, bool]:
        conn = await StreamConnection.open("127.0.0.1", port)
        await conn.exchange(GET)
        if sized:
            assert conn.sized
            body = await conn.read_rest()
        else:
            body = b"".join([piece async for piece in pieces(conn)])
        reusable = conn.reusable
        conn.close()
        return body, reusable

    return asyncio.run(go())


async def pieces(conn: StreamConnection) -> AsyncIterator[bytes]:
    while piece := await conn.read_piece():
        yield piece


def test_the_stream_transport_reads_every_framing(canned: Callable[[list[bytes | None]], Canned]) -> None:
    sized = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n1\r\n!\r\n0\r\nt: 1\r\n\r\n"
    )
    to_close = b"HTTP/1.1 200 OK\r\n\r\nhello, all"
    assert stream_body(canned([sized]).port, sized=True) == (b"hello", True)
    assert stream_body(canned([sized]).port) == (b"hello", True)
    assert stream_body(canned([chunked]).port) == (b"hello!", True)
    assert stream_body(canned([to_close, None]).port) == (b"hello, all", False)


@pytest.mark.parametrize(
    ("size_line", "error"),
    [
        (b"-5", "not a chunk size"),
        (b"zz", "not a chunk size"),
        (b"", "not a chunk size"),
        (b"3", "longer than its size"),
    ],
)
def test_the_stream_transport_refuses_a_bad_chunk(
    canned: Callable[[list[bytes | None]], Canned], size_line: bytes, error: str
) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + size_line + b"\r\nhello\r\n0\r\n\r\n"
    with pytest.raises(HeadError, match=error):
        stream_body(canned([answer]).port)


def test_a_head_longer_than_the_limit_is_refused_by_both_transports(
    canned: Callable[[list[bytes | None]], Canned],
) -> None:
    long = b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    with pytest.raises(asyncio.LimitOverrunError):
        stream_body(canned([long]).port)

    async def socket_head() -> None:
        conn = await SocketConnection.open(("127.0.0.1", canned([long]).port), timeout=5)
        await conn.exchange(GET)

    # Which check refuses it depends on how the bytes arrive: still no blank line at the limit (the read
    # loop), or the whole head, blank line and all, in the read that crossed it (parse_head).
    with pytest.raises(HeadError, match=r"no end of the answer's head|a head of \d+ bytes, above 65536"):
        asyncio.run(socket_head())


def test_the_socket_transport_reads_the_body_into_one_buffer(
    canned: Callable[[list[bytes | None]], Canned],
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: several reads past the head's
    server = canned([b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body] * 2)

    async def go() -> None:
        conn = await SocketConnection.open(("127.0.0.1", server.port), timeout=5)
        for _ in range(2):
            head = await conn.exchange(GET)
            data = await conn.read_into(head.length(len(body)))
            assert isinstance(data, bytearray)
            assert data == body
            assert conn.usable()
        conn.close()

    asyncio.run(go())
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            EOFError,
            "the body ends after 5 of 10 bytes",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhello", HeadError, "3 bytes past the Content-Length"),
    ],
)
def test_the_socket_transport_refuses_a_body_off_its_length(
    canned: Callable[[list[bytes | None]], Canned], answer: bytes, error: type[Exception], message: str
) -> None:
    server = canned([answer, None])

    async def go() -> None:
        conn = await SocketConnection.open(("127.0.0.1", server.port), timeout=5)
        head = await conn.exchange(GET)
        await conn.read_into(head.length(100))

    with pytest.raises(error, match=message):
        asyncio.run(go())


# --- a stale kept-alive connection ---------------------------------------------------------------


Transport = Callable[[int], Awaitable[StreamConnection | SocketConnection]]
TRANSPORTS: dict[str, Transport] = {
    "stream": lambda port: StreamConnection.open("127.0.0.1", port),
    "socket": lambda port: SocketConnection.open(("127.0.0.1", port), timeout=5),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_connection_closed_before_any_answer_is_stale_and_one_cut_in_the_head_is_not(
    canned: Callable[[list[bytes | None]], Canned], transport: str
) -> None:
    async def first(answers: list[bytes | None]) -> None:
        conn = await TRANSPORTS[transport](canned(answers).port)
        await conn.exchange(GET)

    with pytest.raises(Stale):
        asyncio.run(first([None]))
    with pytest.raises((EOFError, asyncio.IncompleteReadError)) as caught:
        asyncio.run(first([b"HTTP/1.1 200 OK\r\n", None]))
    assert not isinstance(caught.value, Stale)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stale_pooled_connection_is_dropped_and_the_request_sent_on_another(
    canned: Callable[[list[bytes | None]], Canned], transport: str
) -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    server = canned([None, None, ok])  # the server closes the pooled ones at their request, answers a new one
    connect = TRANSPORTS[transport]

    async def go() -> list[int]:
        pool: IdlePool[int, StreamConnection | SocketConnection] = IdlePool(
            max_idle=4,
            close=lambda c: c.close(),
            usable=lambda _: True,  # no check: the send finds it stale
        )
        for _ in range(2):
            pool.give(0, await connect(server.port))  # two idle connections, each closed after its answer
        sent: list[int] = []

        async def send(conn: StreamConnection | SocketConnection) -> int:
            sent.append(id(conn))
            return (await conn.exchange(GET)).status

        status = await send_pooled(pool, 0, send, lambda: connect(server.port))
        return [status, len(sent)]

    assert asyncio.run(go()) == [200, 3]
    assert server.connections == 3


# --- the kept-alive pool -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool(clock: Clock, closed: list[str], *, usable: set[str] | None = None) -> IdlePool[str, str]:
    return IdlePool(
        max_idle=2,
        close=closed.append,
        usable=(lambda c: c in usable) if usable is not None else (lambda _: True),
        idle_s=4.0,
        clock=clock,
    )


def test_the_newest_idle_connection_is_taken_first_and_at_most_max_idle_are_kept() -> None:
    clock, closed = Clock(), list[str]()
    p = pool(clock, closed)
    for conn in ("a", "b", "c"):
        p.give("backend:1", conn)
    assert closed == ["c"], "a third idle connection is closed, not kept"
    assert p.take("backend:1") == "b"
    assert p.take("backend:1") == "a"
    assert p.take("backend:1") is None
    assert p.take("other:1") is None


def test_a_connection_idle_too_long_or_closed_by_its_server_is_closed_not_taken() -> None:
    clock, closed = Clock(), list[str]()
    usable = {"fresh"}
    p = pool(clock, closed, usable=usable)
    p.give("b:1", "old")
    clock.now = 3.0
    p.give("b:1", "gone")  # its server closed it meanwhile: not usable
    p.give("c:1", "fresh")
    clock.now = 4.5  # "old" is past idle_s
    assert p.take("b:1") is None
    assert sorted(closed) == ["gone", "old"]
    assert p.take("c:1") == "fresh"


def test_a_sweep_forgets_addresses_whose_connections_all_expired() -> None:
    clock, closed = Clock(), list[str]()
    p = pool(clock, closed)
    p.give("pod-that-left:1", "x")
    clock.now = 10.0
    p.give("pod-still-here:1", "y")  # any call sweeps
    assert closed == ["x"]
    assert p.idle("pod-that-left:1") == 0
    p.close_all()
    assert closed == ["x", "y"]
