"""A backend's answer, back to the client.

A whole answer (not streamed) goes back as it came, with the router's timing headers (`passthrough`).

A completions stream passes through as whole SSE events (`relay_sse`: a cut one is never sent), its text
events timed on the way (TTFT, ITL). One the backend cuts (it died, went quiet, or ended without
`data: [DONE]`) ends with an OpenAI-shaped error event `data: {"error": {...}}` and `data: [DONE]`, not a
silent truncation; so does one the router ends itself at its drain deadline (in_flight.py), with a 503 and
without ejecting the backend. An error event the backend sends itself (a request that failed alone, the
pod serving on) passes through as it came; the answer counts as a 500.

A forwarded answer is relayed as it arrives (`pipe`), SSE or not. A backend that fails mid-answer ends an
SSE answer with an error event, and any other answer with a broken connection (`Cut`): never a
complete-looking answer. Headers go up except hop-by-hop ones, Host, Authorization (the router's key),
Cookie and Accept-Encoding (the answer comes back unencoded: NOT_SENT_UP), and come back except hop-by-hop
ones and those the router's own server writes (NOT_SENT_BACK).

Every write to the client is bounded (`ClientWriter`, --client-write-timeout): a client that stops reading
would otherwise hold its relay, the backend's connection and the engine's request (generating for no one)
for as long as it keeps the connection open. Past the bound its answer is given up: the backend's connection
is closed, the request counted CLIENT_GONE, and the client's connection closed (uvicorn closes it; the
event loop lets the socket go once the bytes already queued for it are sent, or the client leaves: an ASGI
app has no way to reset a connection).

Errors the router answers itself are OpenAI-shaped (`error_response`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Send

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.router.backends import Backends
from kubemoe_runtime.router.dispatch import BackendAnswer
from kubemoe_runtime.router.in_flight import InFlight, drain_deadline_error
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.upstream import UpstreamEnded, UpstreamError, UpstreamTimeout

log = logging.getLogger("kubemoe_runtime.router")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade", "content-length", "host"}
)
NOT_SENT_UP = _HOP_BY_HOP | {"authorization", "cookie", "expect", "accept-encoding"}
NOT_SENT_BACK = _HOP_BY_HOP | {"date", "server"}  # the router's own server writes those

CLIENT_GONE = 499  # counted for a request whose client left, or stopped reading, before its answer's end
WRITE_TIMEOUT_S = 60.0  # the most seconds a client may take none of a streamed answer

Done = Callable[[int], None]
"""Counts a request as answered, with its final status, once its answer has ended."""


def error_response(err: ApiError) -> Response:
    """An OpenAI-shaped error, non-ASCII escaped: a message may quote what the client sent (a model name),
    a lone surrogate included, which UTF-8 (Starlette's JSONResponse) cannot carry."""
    body = json.dumps(err.body(), separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=err.status, media_type="application/json", headers=err.headers())


def passthrough(upstream: BackendAnswer, timing: dict[str, str]) -> Response:
    content_type = upstream.response.headers.get("content-type", "application/json")
    retry_after = upstream.response.headers.get("retry-after", "")  # the last backend's busy/loading hint
    headers = (
        {**timing, "Retry-After": retry_after} if retry_after.isdigit() and len(retry_after) < 6 else timing
    )
    return Response(
        upstream.body or b"", status_code=upstream.status, media_type=content_type, headers=headers
    )


def stream_error(message: str, code: str) -> ApiError:
    return ApiError(502 if code == "backend_failed" else 504, message, type="server_error", code=code)


def carries_text(event: bytes) -> bool:
    """An SSE event with generated text in it (not the role opener, not [DONE], not a usage chunk)."""
    return (b'"text":"' in event and b'"text":""' not in event) or (
        b'"content":"' in event and b'"content":""' not in event
    )


def failure(
    err: UpstreamError | UpstreamTimeout | UpstreamEnded, upstream: BackendAnswer, backends: Backends
) -> ApiError:
    """The error an answer cut short by `err` ends with; a backend that failed mid-answer is ejected (one
    the router ended itself, at its drain deadline, is not: in_flight.py)."""
    if isinstance(err, UpstreamError):
        backends.eject(upstream.backend, reason=f"stream {err.kind}")
        return stream_error(f"the backend failed mid-answer: {err}", "backend_failed")
    if isinstance(err, UpstreamTimeout):
        return stream_error(str(err), "timeout")
    return drain_deadline_error()


def error_event(err: ApiError) -> bytes:
    return f"data: {json.dumps(err.body(), separators=(',', ':'))}\n\n".encode()


class ClientStalled(Exception):
    """The client took none of a write for the write timeout (it stopped reading): its answer is given up."""


class Cut(Exception):
    """A forwarded answer's backend failed mid-body: the client's connection is to be closed."""


class ClientWriter:
    """The way to the client for a relay: the answer's head (`begin`, else with the first write), its body,
    its end; every write bounded by `timeout` (ClientStalled past it)."""

    def __init__(self, send: Send, *, start: Message, timeout: float) -> None:
        self._send = send
        self._start: Message | None = start
        self.timeout = timeout

    async def begin(self) -> None:
        await self._bounded(None)

    async def write(self, data: bytes) -> None:
        await self._bounded({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self._bounded({"type": "http.response.body", "body": b"", "more_body": False})

    async def _bounded(self, message: Message | None) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                if self._start is not None:
                    start, self._start = self._start, None
                    await self._send(start)
                if message is not None:
                    await self._send(message)
        except TimeoutError as err:
            raise ClientStalled(f"the client took nothing for {self.timeout:g} s") from err


Relay = Callable[[ClientWriter], Awaitable[None]]
"""Relays an answer to the client through the writer (`relay_sse`, `pipe`): its head at once, its body as
it comes, then its end, or it raises Cut; releases the backend and counts the answer (`Done`) however it
ends."""


async def relay_sse(
    upstream: BackendAnswer,
    client: ClientWriter,
    *,
    backends: Backends,
    in_flight: InFlight,
    metrics: RouterMetrics,
    start: float,
    decode_start: float,
    done: Done,
) -> None:
    """Pass the decode's (or worker's) SSE events through (whole events: a cut one is never sent), timing
    the text events on the way. A backend that fails, goes quiet, or ends without `data: [DONE]` gets an
    OpenAI-shaped error event, then [DONE], where the rest of the answer would be; an error event of the
    backend's own (a request that failed alone) passes through as it came, and the answer counts as a 500."""
    buffer = b""
    last: float | None = None
    finished = False
    failed = False  # the backend ended the answer with an error event of its own
    code = 200
    error: ApiError | None = None
    try:
        await client.begin()
        with in_flight.relaying(upstream.response):
            try:
                async for chunk in upstream.response.iter_raw():
                    buffer += chunk
                    *events, buffer = buffer.split(b"\n\n")
                    if not events:
                        continue
                    now = time.monotonic()
                    for event in events:
                        if not carries_text(event):
                            finished = finished or event.startswith(b"data: [DONE]")
                            failed = failed or event.startswith(b'data: {"error"')
                            continue
                        if last is None:
                            metrics.ttft.observe(now - start)
                        else:
                            metrics.itl.observe(now - last)
                        last = now
                    await client.write(b"".join(event + b"\n\n" for event in events))
                if buffer.strip():  # a last event without its blank line
                    finished = finished or buffer.startswith(b"data: [DONE]")
                    await client.write(buffer.rstrip(b"\n") + b"\n\n")
                if not finished:
                    error = stream_error(
                        "the backend's stream ended without `data: [DONE]`", "backend_failed"
                    )
            except (UpstreamError, UpstreamTimeout, UpstreamEnded) as err:
                error = failure(err, upstream, backends)
        if error is not None:
            code = error.status
            await client.write(error_event(error) + b"data: [DONE]\n\n")
        elif failed:
            code = 500
        await client.end()
    except ClientStalled:
        code = CLIENT_GONE
        raise
    finally:
        upstream.backend.outstanding -= 1
        await upstream.response.aclose()
        metrics.phase.labels(phase=upstream.backend.role).observe(time.monotonic() - decode_start)
        done(code)


async def pipe(
    upstream: BackendAnswer, client: ClientWriter, *, backends: Backends, in_flight: InFlight, done: Done
) -> None:
    """A forwarded answer's body as it comes. A backend that fails or goes quiet mid-answer ends an SSE
    answer with an OpenAI-shaped error event, and any other answer by breaking the connection (raising
    `Cut`: the client sees the body cut, never a complete-looking answer)."""
    code = upstream.status
    sse = upstream.response.headers.get("content-type", "").startswith("text/event-stream")
    try:
        await client.begin()
        with in_flight.relaying(upstream.response):
            try:
                async for chunk in upstream.response.iter_raw():
                    await client.write(chunk)
                error = None
            except (UpstreamError, UpstreamTimeout, UpstreamEnded) as err:
                error = failure(err, upstream, backends)
        if error is not None:
            code = error.status
            if not sse:
                log.warning("router: %s; the client's connection is closed", error.detail.message)
                raise Cut
            await client.write(b"\n\n" + error_event(error))
        await client.end()
    except ClientStalled:
        code = CLIENT_GONE
        raise
    finally:
        upstream.backend.outstanding -= 1
        await upstream.response.aclose()
        done(code)


class RelayResponse(StreamingResponse):
    """An answer relayed as it comes (`Relay`). A client that takes nothing for `write_timeout` (it stopped
    reading, and the buffers on the way are full) has its answer given up (the relay closes the backend's
    connection, so the engine stops generating for no one), and an answer cut mid-body (`Cut`) ends without
    its last chunk: either way the client's connection is closed (uvicorn: "returned without completing
    response"), never left with a complete-looking answer."""

    def __init__(
        self,
        relay: Relay,
        *,
        write_timeout: float,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        # Not StreamingResponse.__init__: the relay writes the body itself, there is no body iterator.
        # StreamingResponse.__call__ runs `stream_response` beside its watch for the client's disconnect.
        self.relay = relay
        self.write_timeout = write_timeout
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def stream_response(self, send: Send) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        try:
            await self.relay(ClientWriter(send, start=start, timeout=self.write_timeout))
        except Cut:
            return
        except ClientStalled as err:
            log.warning("router: %s: its answer is given up and its connection closed", err)
