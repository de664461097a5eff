"""The prefill side of a KV hand-off: `GET /v1/kv/{handle}` answers a prefilled prompt's KV, once.

The decode named in the router's kv_transfer_params fetches it (serve/kv/pull.py; the protocol is in
handoff.py). A GET takes the KV out of the store: a second GET, or one after it expired, is a 404. A HEAD
(Starlette routes one to every GET handler) would take it too, and its answer carries no body, so the
decode's GET would then find nothing: HEAD is refused (405) and leaves the KV where it is.

The answer is sent under one deadline, the decode's own for the whole GET (kv/pull.py's PULL_TIMEOUT_S):
a decode that stops reading without closing would otherwise hold the taken KV, and the drain that waits for
the request, for good; past it no decode still wants the bytes, and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore
from kubemoe_runtime.engines.torch.serve.kv.pull import PULL_TIMEOUT_S
from kubemoe_runtime.pod.api_error import ApiError

log = logging.getLogger("kubemoe_runtime.kv")
KV_PIECE_BYTES = 1 << 20


def fetch_endpoint(
    store: Callable[[], KVStore], *, send_timeout_s: float = PULL_TIMEOUT_S
) -> Callable[[Request], Awaitable[Response]]:
    """The GET handler: `store()` gives the KV store (ApiError 503 while the engine cannot serve); the
    answer is sent within `send_timeout_s` or cut off (KVResponse)."""

    async def fetch(request: Request) -> Response:
        if request.method != "GET":  # HEAD: it must not take the KV
            error = ApiError(
                405, "a KV is read with GET, once; HEAD would take it", type="invalid_request_error"
            )
            return JSONResponse(error.body(), status_code=405, headers={"allow": "GET, DELETE"})
        handle = request.path_params["handle"]
        prefilled = store().take(handle)
        if prefilled is None:
            raise ApiError(404, "no KV under this handle (expired or taken)", type="not_found_error")
        return KVResponse(*prefilled.wire(), timeout_s=send_timeout_s, shown=f"{handle[:6]}...")

    return fetch


class KVResponse(Response):
    """A KV hand-off answer: the wire pieces as they lie in memory (PrefilledKV.wire), at most
    KV_PIECE_BYTES a message. uvicorn's httptools protocol hands each to the transport as is, so the
    kernel's copy is the only one (h11 copies each piece once); the transport's flow control makes each
    send wait until the last one drained, so a full socket keeps at most one piece's rest in the
    transport's buffer rather than the whole KV. No disconnect watcher (StreamingResponse runs one in a
    task group): once the client is gone, uvicorn drops the rest of the pieces at once.

    A client that stays connected but stops reading would leave a send waiting for the drain forever: the
    whole answer has `timeout_s`, past which the rest is not sent and the answer is left incomplete
    (uvicorn then closes the connection)."""

    def __init__(
        self, parts: list[memoryview], size: int, *, timeout_s: float = PULL_TIMEOUT_S, shown: str = "?"
    ) -> None:
        super().__init__(media_type="application/octet-stream", headers={"content-length": str(size)})
        self.parts = parts
        self.size = size
        self.timeout_s = timeout_s
        self.shown = shown  # the handle as logs show it (cut: it is the KV's bearer secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                for part in self.parts:
                    for at in range(0, part.nbytes, KV_PIECE_BYTES):
                        piece = part[at : at + KV_PIECE_BYTES]
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                        sent += piece.nbytes
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning(
                "kubemoe-runtime: KV %s not read by its decode in %g s (%d of %d bytes sent): dropped",
                self.shown,
                self.timeout_s,
                sent,
                self.size,
            )
