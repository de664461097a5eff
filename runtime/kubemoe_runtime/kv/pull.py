"""The decode side of the KV hand-off: fetch a prefill's KV over HTTP (see handoff.py).

The GET runs on the server's event loop on a plain non-blocking socket: the answer's head is read and
parsed (the status line, then the standard library's `http.client.parse_headers`), and the body goes from
the socket straight into one buffer of its Content-Length (`loop.sock_recv_into`); `PrefilledKV.decode`
then checks the untrusted header and makes the tensors views of that buffer. The kernel's copy is the only
one, and no thread is involved. Connections are kept alive per prefill (at most MAX_IDLE, dropped after
IDLE_S idle); one that the prefill has closed meanwhile fails before any byte of an answer, and the GET
is sent once more on a new connection. Every other failure is a KVPullError.

Why not the standard library's blocking client in a worker thread (http.client, `readinto` the same one
buffer; what this module did before): the two hops between the event loop and the thread cost 0.15-0.3 ms
a pull on a 2-core box, and the reading thread contends for the GIL. Both against bench_kv_handoff.py's
prefill process, pulls alternating between the two (each after a fresh prefill) in one run, medians of
10 (6 at 25 MB), uvicorn on httptools and uvloop; in brackets the share of loopback TCP's bytes/s:

    KV        loopback TCP   thread + http.client   on the loop
    1.5 MB    0.49 ms        3.34 ms (15%)          2.79 ms (18%)
    6.1 MB    2.60 ms        7.14 ms (36%)          5.63 ms (46%)
    24.6 MB   13.6 ms        25.3 ms (54%)          22.5 ms (61%)

No asyncio HTTP client reads a body into a buffer of the caller's (aiohttp, httpx2 hand over a new bytes
object for every piece, which would then be copied once more); the prefill's server is this project's
own, which always answers a KV with a Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from kubemoe_runtime.kv.handoff import ENGINE_ID, PrefilledKV

log = logging.getLogger("kubemoe_runtime.kv")
PULL_TIMEOUT_S = 30.0  # per socket operation: connect, the request, each read
IDLE_S = 4.0  # below uvicorn's keep-alive timeout (5 s), so the prefill rarely closes one under us
MAX_IDLE = 8  # idle connections kept per prefill
MAX_KV_BYTES = 1 << 36  # a Content-Length above this is refused before allocating (64 GiB)
MAX_HEAD_BYTES = 64 << 10
HEAD_READ_BYTES = 64 << 10  # the first read: the head, and the start of the body with it

Address = tuple[str, int]


class KVPullError(RuntimeError):
    """The KV could not be fetched or parsed; the decode prefills the prompt itself."""


class _Stale(Exception):
    """A kept-alive connection was closed before any byte of the answer: nothing was served."""


def wants_pull(params: Mapping[str, Any] | None) -> bool:
    """kv_transfer_params that point at a torch-engine prefill's KV."""
    return bool(
        params
        and params.get("do_remote_prefill")
        and params.get("remote_engine_id") == ENGINE_ID
        and params.get("remote_handle")
        and params.get("remote_host")
        and params.get("remote_port")
    )


def kv_url(params: Mapping[str, Any]) -> str:
    return f"http://{_authority(params)}/v1/kv/{params['remote_handle']}"


def _authority(params: Mapping[str, Any]) -> str:
    host = str(params["remote_host"])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{int(params['remote_port'])}"


class KVPuller:
    """Pulls for one server, on its event loop, over kept-alive connections (plain sockets, so one
    puller serves any loop it is awaited on)."""

    def __init__(self, *, timeout_s: float = PULL_TIMEOUT_S, max_bytes: int = MAX_KV_BYTES) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._idle: dict[Address, list[tuple[float, socket.socket]]] = {}

    async def pull(self, params: Mapping[str, Any]) -> PrefilledKV:
        url = kv_url(params)
        address = (str(params["remote_host"]).strip("[]"), int(params["remote_port"]))
        request = f"GET /v1/kv/{params['remote_handle']} HTTP/1.1\r\nHost: {_authority(params)}\r\n\r\n"
        try:
            data: bytearray | None = None
            if (idle := self._take(address)) is not None:
                with contextlib.suppress(_Stale):  # closed by the prefill while idle: try a new one
                    data = await self._get(idle, address, request.encode(), url)
            if data is None:
                data = await self._get(await self._connect(address, url), address, request.encode(), url)
        except _Stale as err:
            raise KVPullError(f"GET {url}: closed before any answer ({err})") from err
        try:
            return PrefilledKV.decode(data)
        except ValueError as err:
            raise KVPullError(f"GET {url}: {err}") from err

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, sock in connections:
                sock.close()

    async def _connect(self, address: Address, url: str) -> socket.socket:
        try:  # resolution and connect in a thread: rare, as connections are reused
            sock = await asyncio.to_thread(socket.create_connection, address, self.timeout_s)
        except OSError as err:
            raise KVPullError(f"GET {url}: connect: {type(err).__name__}: {err}") from err
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def _get(self, sock: socket.socket, address: Address, request: bytes, url: str) -> bytearray:
        """Send the GET and read the answer's body into one buffer. _Stale if the connection closed
        before any byte of the answer came (the caller then tries a new one, once)."""
        loop = asyncio.get_running_loop()
        head = bytearray()
        keep = False
        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                try:
                    await loop.sock_sendall(sock, request)
                    while (end := head.find(b"\r\n\r\n")) < 0:
                        if len(head) > MAX_HEAD_BYTES:
                            raise KVPullError(f"GET {url}: no end of the answer's head in {len(head)} bytes")
                        chunk = await loop.sock_recv(sock, HEAD_READ_BYTES)
                        if not chunk:
                            raise EOFError("closed by the prefill")
                        head += chunk
                        deadline.reschedule(loop.time() + self.timeout_s)
                except (OSError, EOFError) as err:
                    if not head:
                        raise _Stale(f"{type(err).__name__}: {err}") from err
                    raise
                status, headers = _parse_head(bytes(head[:end]), url)
                if status != 200:
                    raise KVPullError(f"GET {url}: HTTP {status}")
                length = _content_length(headers, url, limit=self.max_bytes)
                start = head[end + 4 :]
                if len(start) > length:
                    raise KVPullError(f"GET {url}: {len(start) - length} bytes past the Content-Length")
                data = bytearray(length)
                view = memoryview(data)
                got = len(start)
                view[:got] = start
                while got < length:
                    n = await loop.sock_recv_into(sock, view[got:])
                    if not n:
                        raise KVPullError(f"GET {url}: the body ends after {got} of {length} bytes")
                    got += n
                    deadline.reschedule(loop.time() + self.timeout_s)
                keep = headers.get("connection", "").lower() != "close"
        except TimeoutError as err:
            raise KVPullError(f"GET {url}: no progress in {self.timeout_s:g} s") from err
        except (OSError, EOFError, http.client.HTTPException) as err:
            raise KVPullError(f"GET {url}: {type(err).__name__}: {err}") from err
        finally:
            if not keep:
                sock.close()
        self._release(address, sock)
        return data

    def _take(self, address: Address) -> socket.socket | None:
        self._sweep()
        idle = self._idle.get(address)
        return idle.pop()[1] if idle else None

    def _release(self, address: Address, sock: socket.socket) -> None:
        self._sweep()
        idle = self._idle.setdefault(address, [])
        if len(idle) < MAX_IDLE:
            idle.append((time.monotonic(), sock))
        else:
            sock.close()

    def _sweep(self) -> None:
        """Close the connections idle for IDLE_S or more (every prefill's: pods come and go)."""
        deadline = time.monotonic() - IDLE_S
        for address, idle in list(self._idle.items()):
            for _, sock in (stale := [entry for entry in idle if entry[0] < deadline]):
                sock.close()
            if stale:
                idle[:] = [entry for entry in idle if entry[0] >= deadline]
            if not idle:
                del self._idle[address]


def _parse_head(head: bytes, url: str) -> tuple[int, http.client.HTTPMessage]:
    """The status code and the headers of an HTTP/1.x answer's head (without its blank line)."""
    status_line, _, fields = head.partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise KVPullError(f"GET {url}: not an HTTP/1.x answer: {status_line[:80]!r}")
    headers = http.client.parse_headers(io.BytesIO(fields + b"\r\n\r\n"))
    return int(code), headers


def _content_length(headers: http.client.HTTPMessage, url: str, *, limit: int) -> int:
    if headers.get("transfer-encoding"):
        raise KVPullError(
            f"GET {url}: Transfer-Encoding {headers['transfer-encoding']}, not a Content-Length"
        )
    lengths = set(headers.get_all("content-length") or [])
    if len(lengths) != 1 or not (value := lengths.pop().strip()).isdigit():
        raise KVPullError(f"GET {url}: Content-Length {headers.get_all('content-length')} is not one length")
    if int(value) > limit:
        raise KVPullError(f"GET {url}: Content-Length {value} is above {limit}")
    return int(value)
