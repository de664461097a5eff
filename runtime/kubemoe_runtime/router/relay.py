"""A backend's answer, back to the client.

A whole answer (not streamed) goes back as it came, with the router's timing headers (`passthrough`).

A completions stream passes through as whole SSE events (`relay_sse`: a cut one is never sent), its text
events timed on the way (TTFT, ITL). One the backend cuts (it died, went quiet, or ended without
`data: [DONE]`) ends with an OpenAI-shaped error event `data: {"error": {...}}` and `data: [DONE]`, not a
silent truncation.

A forwarded answer is relayed as it arrives (`pipe`), SSE or not. A backend that fails mid-answer ends an
SSE answer with an error event, and any other answer with a broken connection (`CutStreamingResponse`):
never a complete-looking answer. Headers go up except hop-by-hop ones, Host, Authorization (the router's
key), Cookie and Accept-Encoding (the answer comes back unencoded: NOT_SENT_UP), and come back except
hop-by-hop ones and those the router's own server writes (NOT_SENT_BACK).

Errors the router answers itself are OpenAI-shaped (`error_response`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from kubemoe_runtime.pod.protocol import ApiError
from kubemoe_runtime.router.backends import Backends
from kubemoe_runtime.router.dispatch import BackendAnswer
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("kubemoe_runtime.router")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade", "content-length", "host"}
)
NOT_SENT_UP = _HOP_BY_HOP | {"authorization", "cookie", "expect", "accept-encoding"}
NOT_SENT_BACK = _HOP_BY_HOP | {"date", "server"}  # the router's own server writes those

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


async def relay_sse(
    upstream: BackendAnswer,
    *,
    backends: Backends,
    metrics: RouterMetrics,
    start: float,
    decode_start: float,
    done: Done,
) -> AsyncIterator[bytes]:
    """Pass the decode's (or worker's) SSE events through (whole events: a cut one is never sent), timing
    the text events on the way. A backend that fails, goes quiet, or ends without `data: [DONE]` gets an
    OpenAI-shaped error event, then [DONE], where the rest of the answer would be."""
    buffer = b""
    last: float | None = None
    finished = False
    code = 200
    error: ApiError | None = None
    try:
        try:
            async for chunk in upstream.response.iter_raw():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                if not events:
                    continue
                now = time.monotonic()
                for event in events:
                    finished = finished or event.startswith(b"data: [DONE]")
                    if not carries_text(event):
                        continue
                    if last is None:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.itl.observe(now - last)
                    last = now
                yield b"".join(event + b"\n\n" for event in events)
            if buffer.strip():  # a last event without its blank line
                finished = finished or buffer.startswith(b"data: [DONE]")
                yield buffer.rstrip(b"\n") + b"\n\n"
            if not finished:
                error = stream_error("the backend's stream ended without `data: [DONE]`", "backend_failed")
        except UpstreamError as err:  # the backend died mid-answer
            backends.eject(upstream.backend, reason=f"stream {err.kind}")
            error = stream_error(f"the backend failed mid-answer: {err}", "backend_failed")
        except UpstreamTimeout as err:
            error = stream_error(str(err), "timeout")
        if error is not None:
            code = error.status
            yield f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
    finally:
        upstream.backend.outstanding -= 1
        await upstream.response.aclose()
        metrics.phase.labels(phase=upstream.backend.role).observe(time.monotonic() - decode_start)
        done(code)


async def pipe(upstream: BackendAnswer, *, backends: Backends, done: Done) -> AsyncIterator[bytes]:
    """A forwarded answer's body as it comes. A backend that fails or goes quiet mid-answer ends an SSE
    answer with an OpenAI-shaped error event, and any other answer by breaking the connection (raising
    `Cut`: the client sees the body cut, never a complete-looking answer)."""
    code = upstream.status
    sse = upstream.response.headers.get("content-type", "").startswith("text/event-stream")
    try:
        try:
            async for chunk in upstream.response.iter_raw():
                yield chunk
        except (UpstreamError, UpstreamTimeout) as err:
            if isinstance(err, UpstreamError):
                backends.eject(upstream.backend, reason=f"stream {err.kind}")
                error = stream_error(f"the backend failed mid-answer: {err}", "backend_failed")
            else:
                error = stream_error(str(err), "timeout")
            code = error.status
            if not sse:
                log.warning("router: %s; the client's connection is closed", error.detail.message)
                raise Cut from err
            yield f"\n\ndata: {json.dumps(error.body(), separators=(',', ':'))}\n\n".encode()
    finally:
        upstream.backend.outstanding -= 1
        await upstream.response.aclose()
        done(code)


class Cut(Exception):
    """A forwarded answer's backend failed mid-body: the client's connection is to be closed."""


class CutStreamingResponse(StreamingResponse):
    """A forwarded answer, relayed as it comes; one cut mid-body (`Cut`) ends without its last chunk, the
    connection closed (uvicorn: "returned without completing response"), so the client sees it cut."""

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except Cut:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
