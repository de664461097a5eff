"""The pod's port in front of vLLM: the same probe and metrics endpoints as the torch engine's server.

    GET /health    500 once vLLM has exited or, after it became ready, once its /health fails; else 200
    GET /ready     200 while vLLM's /health answers 200 (a --headless pod: while vLLM runs), else 503
    GET /metrics   vLLM's /metrics unchanged, then the kubemoe_* series derived from it (metrics.py) and
                   the GPUs' kubemoe_gpu_* series; with ?kubemoe=1 (AUTOSCALER_QUERY: the operator's
                   scrape) the kubemoe_* and kubemoe_gpu_* series alone, a few KiB where vLLM's own
                   series of a wide group's every rank weigh megabytes. Rendered on a worker thread:
                   parsing vLLM's page takes long enough to hold up the tokens this loop relays.
    anything else  proxied to vLLM (method, path, query, headers, body), the response streamed back
                   (SSE included); in OpenAI's error shape, 503 while vLLM is not listening yet or once
                   it has exited, 502 when it drops the request (the router retries both elsewhere).
                   kv_transfer_params reach vLLM only when the router signed them (pod/kv_auth.py),
                   without the signature; else 400: vLLM would connect where they say.

The front decides on a body as vLLM reads it, never on its bytes (a key can be spelt with escapes, the
body sent in UTF-16...): a non-empty body must be a JSON object, whatever its Content-Type (vLLM parses
some bodies as JSON regardless of it), else 400; its decoded kv_transfer_params (and vllm_xargs', which
vLLM passes on as the same) are checked, and what goes to vLLM is the object re-serialized, the one that
was checked (a duplicate key, say, does not reach vLLM at all). A body nested too deeply to parse, or
with a number too long to convert, is a 400 too.

A --headless pod runs engines only: it answers /health and /ready, and 404 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx2
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kubemoe_runtime.engines.vllm.metrics import autoscaler_page, render
from kubemoe_runtime.pod.gpu_metrics import GpuCollector
from kubemoe_runtime.pod.http_pool import IDLE_S
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVAuthError, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels

PROBE_TIMEOUT_S: Final = 5.0
KV_PARAMS_FIELD: Final = "kv_transfer_params"
XARGS_FIELD: Final = "vllm_xargs"  # vLLM's extra sampling arguments: it reads kv_transfer_params there too
KV_HOLD_S: Final = 30.0
"""How long a draining prefill stays up after its last KV hand-off: a decode pulls at once unless its
queue holds the request, and 30 s of queue is already a role that needs more groups. (vLLM itself
frees KV nobody pulled after its own abort timeout, minutes.)"""
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the two HTTP stacks recompute.
_NOT_FORWARDED: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
AUTOSCALER_QUERY: Final = "kubemoe"
"""`GET /metrics?kubemoe=1`: the autoscaler's page (the operator's autoscale/pages.py asks for it)."""


@dataclass
class VllmUpstream:
    """The vLLM process this pod supervises and where it listens."""

    process: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    headless: bool
    labels: MetricLabels
    was_ready: bool = False
    session: httpx2.AsyncClient | None = field(default=None, repr=False)
    handed_off_at: float | None = None
    """When this prefill last answered a request whose KV a decode is to pull (do_remote_decode)."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def kv_waiting(self) -> int:
        """1 while KV this prefill handed off may still be waiting for its decode's pull, else 0:
        vLLM's connector reads it engine to engine (NIXL), out of this front's sight, so a drain
        (Drain.pending) holds the pod for KV_HOLD_S after the last such answer instead."""
        at = self.handed_off_at
        return int(at is not None and self.clock() - at < KV_HOLD_S)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def client(self) -> httpx2.AsyncClient:
        if self.session is None:
            # No read timeout: a long generation streams for as long as it takes. Idle connections go
            # after IDLE_S, before vLLM's own keep-alive (uvicorn's 5 s) closes them: one reused just as
            # vLLM closes it would fail the request sent on it.
            self.session = httpx2.AsyncClient(
                timeout=httpx2.Timeout(None, connect=5.0),
                limits=httpx2.Limits(
                    max_connections=None, max_keepalive_connections=64, keepalive_expiry=IDLE_S
                ),
            )
        return self.session

    async def get(self, path: str) -> httpx2.Response | None:
        """GET a small vLLM endpoint; None while vLLM is not listening or not answering."""
        try:
            return await self.client().get(f"{self.url}{path}", timeout=PROBE_TIMEOUT_S)
        except httpx2.TransportError:
            return None

    async def upstream_health(self) -> int | None:
        """vLLM's /health status, or None while it is not listening."""
        response = await self.get("/health")
        return None if response is None else response.status_code


FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
FORM_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
"""Where vLLM parses the body as a form: such a body is passed on unchanged (elsewhere some vLLM routes
read any body as JSON whatever its Content-Type, so every other body is checked)."""
OFF_LOOP_BYTES = 256 << 10
"""JSON bodies larger than this are checked on a worker thread, off the event loop."""


def _openai_error(status: int, message: str, *, code: str, retry_after: int | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def verified_body(body: bytes, signer: KVSigner | None) -> tuple[bytes, dict[str, Any] | None] | JSONResponse:
    """The body to send vLLM: the JSON object it is, re-serialized, with its kv_transfer_params verified and
    unsigned; and those parameters (None when it has none). Or a 400 saying why not.

    Decided on the decoded object, as vLLM reads it (stdlib json, whatever the Content-Type, UTF-16/32
    included), never on the bytes; what goes on is that object, so vLLM reads what was checked."""
    try:
        request = json.loads(body)
    except RecursionError:
        return _refused("the body is nested too deeply", param=None)
    except ValueError as err:  # not JSON, not UTF-8/16/32, a number of thousands of digits
        return _refused(f"the body is not JSON: {err}", param=None)  # never forward what was not checked
    if not isinstance(request, dict):
        return _refused("the body must be a JSON object", param=None)
    xargs = request.get(XARGS_FIELD)
    if isinstance(xargs, dict) and KV_PARAMS_FIELD in xargs:  # vLLM takes them from there too
        return _refused(
            f"{XARGS_FIELD}.{KV_PARAMS_FIELD}: not accepted (kv_transfer_params are set by the router only)",
            param=XARGS_FIELD,
        )
    params = request.get(KV_PARAMS_FIELD)
    verified: dict[str, Any] | None = None
    if params is not None:
        try:
            if signer is None:
                raise KVAuthError(f"this pod has no key to verify them ({KV_KEY_ENV} is not set)")
            if not isinstance(params, dict):
                raise KVAuthError("must be an object")
            verified = signer.verify(params)
        except KVAuthError as err:
            return _refused(f"{KV_PARAMS_FIELD}: {err}", param=KV_PARAMS_FIELD)
        request[KV_PARAMS_FIELD] = verified
    try:
        return _json_bytes(request), verified
    except RecursionError:
        return _refused("the body is nested too deeply", param=None)


def _json_bytes(value: dict[str, Any]) -> bytes:
    """`value` as compact JSON in UTF-8; with non-ASCII escaped when it holds a lone surrogate (which
    UTF-8 cannot carry; vLLM decodes the escape to the same string)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _refused(message: str, *, param: str | None) -> JSONResponse:
    return JSONResponse(invalid_request(message, param=param), status_code=400)


def invalid_request(message: str, *, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def front_app(upstream: VllmUpstream, *, signer: KVSigner | None = None) -> Starlette:
    """`signer`: the deployment's KV key (KVSigner.from_env() in a pod), to verify kv_transfer_params."""
    gpus = CollectorRegistry()  # kubemoe_gpu_* from NVML, as the torch server exports; none without a driver
    gpus.register(GpuCollector(upstream.labels.as_dict()))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if upstream.session is not None:
                await upstream.session.aclose()

    async def health(_: Request) -> Response:
        code = upstream.exit_code()
        if code is not None:
            return PlainTextResponse(f"vLLM exited with code {code}", status_code=500)
        if upstream.headless or not upstream.was_ready:
            return PlainTextResponse("ok")
        status = await upstream.upstream_health()
        if status != 200:
            return PlainTextResponse(f"vLLM /health answered {status}", status_code=500)
        return PlainTextResponse("ok")

    async def ready(_: Request) -> Response:
        if upstream.exit_code() is not None:
            return PlainTextResponse("vLLM exited", status_code=503)
        if upstream.headless:
            return PlainTextResponse("ready")
        if await upstream.upstream_health() == 200:
            upstream.was_ready = True
            return PlainTextResponse("ready")
        return PlainTextResponse("loading", status_code=503)

    def page(vllm_page: bytes, *, autoscaler: bool) -> bytes:
        text = vllm_page.decode("utf-8", errors="replace")
        ours = autoscaler_page(text, upstream.labels) if autoscaler else render(text, upstream.labels)
        return ours + generate_latest(gpus)

    async def metrics(request: Request) -> Response:
        response = None if upstream.headless else await upstream.get("/metrics")
        body = response.content if response is not None and response.status_code == 200 else b""
        autoscaler = request.query_params.get(AUTOSCALER_QUERY) == "1"
        exported = await asyncio.to_thread(page, body, autoscaler=autoscaler)  # off the relaying loop
        return Response(exported, media_type=METRICS_TYPE)

    async def proxy(request: Request) -> Response:
        url = f"{upstream.url}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        body = await request.body()
        hands_off = False
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        form = content_type in FORM_TYPES and request.url.path in FORM_PATHS  # no kv_transfer_params there
        if body and not form:
            big = len(body) > OFF_LOOP_BYTES  # an 8 MiB body takes ~40 ms to decode and encode again
            checked = (
                await asyncio.to_thread(verified_body, body, signer) if big else verified_body(body, signer)
            )
            if isinstance(checked, Response):
                return checked
            body, params = checked
            hands_off = params is not None and params.get("do_remote_decode") is True
        client = upstream.client()
        outgoing = client.build_request(request.method, url, headers=headers, content=body)
        try:
            response = await client.send(outgoing, stream=True)
        except httpx2.TransportError as err:
            if upstream.exit_code() is not None:
                return _openai_error(503, "the vLLM engine has exited", code="engine_failed")
            if isinstance(err, httpx2.ConnectError):
                return _openai_error(503, "the model is still loading", code="model_loading", retry_after=5)
            # Reset, cut before its answer, an answer that is no HTTP: the router tries another pod.
            reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            return _openai_error(502, f"vLLM did not answer: {reason}", code="backend_failed")
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _NOT_FORWARDED}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():  # undecoded: content-encoding goes back as is
                    yield chunk
            finally:
                await response.aclose()
                if hands_off and response.status_code == 200:  # KV now waits for a decode's pull
                    upstream.handed_off_at = upstream.clock()

        # Closing the upstream response (also when the client goes away mid-stream) makes vLLM abort it.
        return StreamingResponse(
            chunks(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(response.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    routes = [Route("/health", health), Route("/ready", ready), Route("/metrics", metrics)]
    if not upstream.headless:
        routes.append(Route("/{path:path}", proxy, methods=methods))
    return Starlette(routes=routes, lifespan=lifespan)
