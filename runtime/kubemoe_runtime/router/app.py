"""The router's HTTP app: its routes over a `Router` (proxy.py), and its errors.

    GET  /health                200 while the router runs
    GET  /ready                 200 once every role has a healthy backend, else 503
    GET  /metrics               the router's Prometheus series (metrics.py)
    GET  /v1/models             the served model names, with the backends' max_model_len (asked of one
                                and kept for MODELS_TTL_S, as the operator does not pass it to the router;
                                null until a backend has answered: models.py)
    GET  /v1/models/{model}     one of them (404 for another name)
    POST /v1/completions        proxied; streaming (SSE, passed through byte for byte) or not
    POST /v1/chat/completions   proxied likewise
    any  /v1/*, /tokenize,      forwarded to one backend (`forward`): GET, POST, PUT, PATCH or DELETE,
         /detokenize, /version  the path and query as sent, the answer (status, headers, body) streamed
                                back as it comes; what the backend does not serve is its own 404
    any  /v1/experts/*, /v1/kv/*  404: not forwarded (the operator's expert load and placement; the KV
                                hand-off between pods). Nor are the backends' /metrics, /ready, /health.

Every error the router answers itself is OpenAI-shaped, {"error": {"message", "type", "param", "code"}}:
those its handlers raise (ApiError: a 401 for a missing API key, a 404 for an unknown model, ...) and
Starlette's own (a 404 for an unknown path, a 405 for a method a route does not take).

On shutdown the app stops the backends' discovery and health loops, waits for the KV releases under way
(kv_release.py, each bounded), and closes its connections to the backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.router.checks import ENGINE_PATHS
from kubemoe_runtime.router.relay import error_response

if TYPE_CHECKING:
    from kubemoe_runtime.router.proxy import Router

FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def build_router_app(router: Router) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await router.backends.start()
        try:
            yield
        finally:
            await router.backends.stop()
            await router.kv_releases.aclose()
            await router.upstream.aclose()

    routes = [
        Route("/health", router.health, methods=["GET"]),
        Route("/ready", router.ready, methods=["GET"]),
        Route("/metrics", router.metrics_endpoint, methods=["GET"]),
        Route("/v1/models", router.models, methods=["GET"]),
        Route("/v1/models/{model:path}", router.model, methods=["GET"]),
        Route("/v1/completions", router.completions, methods=["POST"]),
        Route("/v1/chat/completions", router.chat_completions, methods=["POST"]),
        *(Route(path, router.forward, methods=FORWARD_METHODS) for path in ENGINE_PATHS),
        Route("/v1/{rest:path}", router.forward, methods=FORWARD_METHODS),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        # ApiError: what a handler raises outside _generate (GET /v1/models without a key: a 401, not a 500)
        exception_handlers={HTTPException: _http_error, ApiError: _api_error},  # type: ignore[dict-item]
    )


async def _api_error(_: Request, err: ApiError) -> Response:
    return error_response(err)


async def _http_error(_: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(err.status_code, str(err.detail), type=kind))
