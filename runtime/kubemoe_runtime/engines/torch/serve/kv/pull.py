"""The decode side of the KV hand-off: fetch a prefill's KV over HTTP (see handoff.py).

The GET runs on the server's event loop on a plain non-blocking socket (pod/http_connections.py's
SocketConnection; the head parser, pod/http_heads.py, and keep-alive pool, pod/http_pool.py, the router
shares): the answer's head is read and checked, and the body goes from the socket straight into one buffer
of its Content-Length (`loop.sock_recv_into`); `PrefilledKV.decode` then checks the untrusted header and
makes the tensors views of that buffer. The kernel's copy is the only one, and no thread is involved.
Connections are kept alive per prefill (at most MAX_IDLE, dropped after pod/http_pool.py's IDLE_S idle);
one that the prefill has closed meanwhile is mostly found so as it is taken (a non-blocking peek), else it
fails before any byte of an answer, and the GET is sent once more on another connection. Every other
failure is a KVPullError.

The parameters are untrusted too (serve/app.py verifies the router's signature first): `pull_target`
takes a handle of HANDLE_CHARS only, a host that is an IP address or a DNS name, and a port in 1..65535,
before any socket is opened, so nothing else reaches a connect() or the request line. The whole GET runs
under one deadline (`timeout_s`: a prefill that drips bytes is cut off), and a Content-Length above the
caller's cap (serve/kv/layout.py: what the prompt's KV can take) is refused before the buffer is allocated.

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
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemoe_runtime.engines.torch.serve.kv.handoff import ENGINE_ID, PrefilledKV
from kubemoe_runtime.pod.http_connections import SocketConnection
from kubemoe_runtime.pod.http_heads import request_head
from kubemoe_runtime.pod.http_pool import IdlePool, Stale, send_pooled
from kubemoe_runtime.pod.kv_auth import KV_HANDLE

log = logging.getLogger("kubemoe_runtime.kv")
PULL_TIMEOUT_S = 30.0  # the whole GET: connect, the request, the answer to its last byte
MAX_IDLE = 8  # idle connections kept per prefill (pod/http_pool.py's IdlePool)
MAX_KV_BYTES = 1 << 36  # refused before allocating whatever the caller's cap (64 GiB)

Address = tuple[str, int]
HANDLE_CHARS = KV_HANDLE  # what KVStore hands out: secrets.token_urlsafe
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


class KVPullError(RuntimeError):
    """The KV could not be fetched or parsed; the decode prefills the prompt itself."""


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


@dataclass(frozen=True)
class PullTarget:
    """Where a prefill's KV is, checked: safe to put into a connect() and an HTTP request line."""

    host: str  # an IP address (IPv6 without brackets) or a DNS name
    port: int
    handle: str

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}/v1/kv/{self.handle}"

    @property
    def shown(self) -> str:
        """`url` for errors and logs: the handle cut to its first characters (whoever has it whole can
        fetch the KV, once: it is the KV's bearer secret), as the rest of the runtime shows handles."""
        return f"http://{self.authority}/v1/kv/{self.handle[:6]}..."


def pull_target(params: Mapping[str, Any]) -> PullTarget:
    """The host, port and handle of kv_transfer_params; ValueError, naming the field, unless each is
    well-formed."""
    handle, host, port = params.get("remote_handle"), params.get("remote_host"), params.get("remote_port")
    if not isinstance(handle, str) or not HANDLE_CHARS.fullmatch(handle):
        raise ValueError(f"remote_handle {_short(handle)} is not 1-128 characters of [A-Za-z0-9_-]")
    if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 literal as a URL writes it
    if not isinstance(host, str) or not _is_host(host):
        raise ValueError(f"remote_host {_short(host)} is not an IP address or a DNS name")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"remote_port {_short(port)} is not a port number (1-65535)")
    return PullTarget(host=host, port=port, handle=handle)


def kv_url(params: Mapping[str, Any]) -> str:
    return pull_target(params).url


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _DNS_NAME.fullmatch(host) is not None
    return "%" not in host  # no IPv6 zone: it would name an interface of the decode's own node


def _short(value: object) -> str:
    return repr(value)[:80]


class KVPuller:
    """Pulls for one server, on its event loop, over kept-alive connections (plain sockets, so one
    puller serves any loop it is awaited on)."""

    def __init__(self, *, timeout_s: float = PULL_TIMEOUT_S, max_bytes: int = MAX_KV_BYTES) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._idle: IdlePool[Address, SocketConnection] = IdlePool(
            max_idle=MAX_IDLE, close=SocketConnection.close, usable=SocketConnection.usable
        )

    async def pull(self, params: Mapping[str, Any], *, max_bytes: int | None = None) -> PrefilledKV:
        """The KV `params` point at, in at most `timeout_s` and `max_bytes` (and the puller's own cap)."""
        try:
            target = pull_target(params)
        except ValueError as err:
            raise KVPullError(f"kv_transfer_params: {err}") from err
        url, address = target.shown, (target.host, target.port)  # url: for messages, the handle cut
        request = request_head("GET", f"/v1/kv/{target.handle}", host=target.authority, body_length=None)
        limit = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)

        async def get(conn: SocketConnection) -> bytearray:
            head = await conn.exchange(request)
            if head.status != 200:
                conn.close()
                raise KVPullError(f"GET {url}: HTTP {head.status}")
            try:
                length = head.length(limit)
            except ValueError:
                conn.close()
                raise
            data = await conn.read_into(length)
            if head.keep_alive:
                self._idle.give(address, conn)
            else:
                conn.close()
            return data

        try:
            async with asyncio.timeout(self.timeout_s):
                data = await send_pooled(self._idle, address, get, lambda: self._connect(address, url))
        except TimeoutError as err:
            raise KVPullError(f"GET {url}: not complete in {self.timeout_s:g} s") from err
        except Stale as err:
            raise KVPullError(f"GET {url}: closed before any answer ({err})") from err
        except (OSError, EOFError) as err:
            raise KVPullError(f"GET {url}: {type(err).__name__}: {err}") from err
        except ValueError as err:  # the answer's head or framing (http_heads.HeadError)
            raise KVPullError(f"GET {url}: {err}") from err
        try:
            return PrefilledKV.decode(data)
        except ValueError as err:
            raise KVPullError(f"GET {url}: {err}") from err

    def close(self) -> None:
        self._idle.close_all()

    async def _connect(self, address: Address, url: str) -> SocketConnection:
        try:
            return await SocketConnection.open(address, timeout=self.timeout_s)
        except OSError as err:
            raise KVPullError(f"GET {url}: connect: {type(err).__name__}: {err}") from err
