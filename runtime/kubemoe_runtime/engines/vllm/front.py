"""The pod's port in front of vLLM: the same probe and metrics endpoints as the torch engine's server.

    GET /health    500 once vLLM has exited or, after it became ready, once its /health fails; else 200
    GET /ready     200 while vLLM's /health answers 200 (a --headless pod: while vLLM runs), else 503
    GET /metrics   vLLM's /metrics unchanged, then the kubemoe_* series derived from it (metrics.py)
    anything else  proxied to vLLM as is (method, path, query, headers, body), the response streamed
                   back (SSE included); 503 in OpenAI's error shape while vLLM is not listening yet.
                   A JSON body's kv_transfer_params reach vLLM only when the router signed them
                   (pod/kv_auth.py), without the signature; else 400: vLLM would connect where they say.

A --headless pod runs engines only: it answers /health and /ready, and 404 otherwise.
"""

from __future__ import annotations

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

from kubemoe_runtime.engines.vllm.metrics import render
from kubemoe_runtime.pod.gpu_metrics import GpuCollector
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVAuthError, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels

PROBE_TIMEOUT_S: Final = 5.0
KV_PARAMS_FIELD: Final = "kv_transfer_params"
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
            # No read timeout: a long generation streams for as long as it takes.
            self.session = httpx2.AsyncClient(
                timeout=httpx2.Timeout(None, connect=5.0),
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
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


def _openai_error(status: int, message: str, *, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def verified_body(body: bytes, signer: KVSigner | None) -> tuple[bytes, dict[str, Any] | None] | JSONResponse:
    """The request body with its kv_transfer_params verified and unsigned, and those parameters (None
    when it has none); or a 400 saying why not."""
    try:
        request = json.loads(body)
    except ValueError:
        return JSONResponse(
            invalid_request("the body is not JSON", param=None), status_code=400
        )  # vLLM would refuse it too; never forward what was not checked
    params = request.get(KV_PARAMS_FIELD) if isinstance(request, dict) else None
    if params is None:
        return body, None
    try:
        if signer is None:
            raise KVAuthError(f"this pod has no key to verify them ({KV_KEY_ENV} is not set)")
        if not isinstance(params, dict):
            raise KVAuthError("must be an object")
        verified = signer.verify(params)
    except KVAuthError as err:
        return JSONResponse(
            invalid_request(f"{KV_PARAMS_FIELD}: {err}", param=KV_PARAMS_FIELD), status_code=400
        )
    request[KV_PARAMS_FIELD] = verified
    return json.dumps(request).encode(), verified


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

    async def metrics(_: Request) -> Response:
        response = None if upstream.headless else await upstream.get("/metrics")
        text = response.text if response is not None and response.status_code == 200 else ""
        exported = render(text, upstream.labels) + generate_latest(gpus)
        return Response(exported, media_type=METRICS_TYPE)

    async def proxy(request: Request) -> Response:
        url = f"{upstream.url}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        body = await request.body()
        hands_off = False
        if KV_PARAMS_FIELD.encode() in body:
            checked = verified_body(body, signer)
            if isinstance(checked, Response):
                return checked
            body, params = checked
            hands_off = params is not None and params.get("do_remote_decode") is True
        client = upstream.client()
        outgoing = client.build_request(request.method, url, headers=headers, content=body)
        try:
            response = await client.send(outgoing, stream=True)
        except httpx2.ConnectError:
            if upstream.exit_code() is not None:
                return _openai_error(503, "the vLLM engine has exited", code="engine_failed")
            return _openai_error(503, "the model is still loading", code="model_loading")
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
