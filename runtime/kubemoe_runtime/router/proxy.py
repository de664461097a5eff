"""The router's HTTP app: an OpenAI-compatible front door over the engines' own servers.

    GET  /health                200 while the router runs
    GET  /ready                 200 once every role has a healthy backend, else 503
    GET  /metrics               the router's Prometheus series (metrics.py)
    GET  /v1/models             the served model names
    POST /v1/completions        proxied; streaming (SSE, passed through byte for byte) or not
    POST /v1/chat/completions   proxied likewise

Colocated (`--worker-service`): the request goes to one worker, chosen by the policy.

Disaggregated (`--prefill-service` and `--decode-service`), vLLM's P/D proxy protocol (its
disaggregated-serving proxy examples): the request goes to a prefill with max_tokens=1, stream off and
kv_transfer_params {"do_remote_decode": true, ...}; the kv_transfer_params of its answer are added to the
original request, which goes to a decode; the decode's answer (streamed or not) is the client's. Engines
whose connector needs no parameters (vLLM's ExampleConnector: KV by prompt hash in a shared directory)
answer none, and the decode gets the request unchanged.

A request is retried on another backend of the same role when the first one refuses the connection, drops
it before answering, or answers 503; a streaming answer is never retried once its first byte went out.
The router checks only what it must read (a JSON object, the prompt or messages, `stream`, the model
name); the engines validate the rest and their 4xx answers pass through unchanged.
Answers carry timing headers: x-kubemoe-prefill-ms / x-kubemoe-decode-ms (P/D) and the backends used.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kubemoe_runtime.router.auth import ApiKeys
from kubemoe_runtime.router.backends import Backend, Backends
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.policies import Policy
from kubemoe_runtime.router.upstream import Upstream, UpstreamError, UpstreamResponse
from kubemoe_runtime.server.protocol import ApiError, ModelCard, ModelList

MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_KEY_CHARS = 512  # what prefix-hash hashes: the start of the prompt
RETRY_STATUS = frozenset({502, 503, 504})
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass
class RouterConfig:
    served_names: tuple[str, ...]
    disaggregated: bool
    policies: dict[str, Policy]  # per role (each keeps its own rotation)
    max_attempts: int = 3
    api_keys: ApiKeys | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _Upstream:
    """A backend's answer: either fully read (`body`) or open for streaming (`response`)."""

    def __init__(self, backend: Backend, response: UpstreamResponse, *, body: bytes | None) -> None:
        self.backend = backend
        self.response = response
        self.body = body

    @property
    def status(self) -> int:
        return self.response.status


class Router:
    def __init__(self, config: RouterConfig, *, backends: Backends, metrics: RouterMetrics) -> None:
        self.config = config
        self.backends = backends
        self.metrics = metrics
        self.upstream = Upstream(connect_timeout=5.0)

    # --- endpoints ----------------------------------------------------------------------------------

    async def health(self, _: Request) -> Response:
        return PlainTextResponse("ok")

    async def ready(self, _: Request) -> Response:
        if self.backends.ready():
            return PlainTextResponse("ready")
        missing = [role for role, pool in self.backends.pools.items() if not pool.healthy()]
        return PlainTextResponse(f"no healthy backend for: {', '.join(missing)}", status_code=503)

    async def metrics_endpoint(self, _: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        cards = [
            ModelCard(id=name, created=self.config.created, root=name, max_model_len=0)
            for name in self.config.served_names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, endpoint="/v1/completions", prompt_field="prompt")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, endpoint="/v1/chat/completions", prompt_field="messages")

    # --- the proxy ----------------------------------------------------------------------------------

    async def _generate(self, request: Request, *, endpoint: str, prompt_field: str) -> Response:
        start = time.monotonic()
        self.metrics.in_flight.inc()
        code = 500
        streaming = False
        try:
            self._authorize(request)
            body, raw = await _read_json(request)
            self._check(body, prompt_field=prompt_field)
            key = _prefix_key(body.get(prompt_field))
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            headers = {"content-type": "application/json", "x-request-id": request_id}
            timing: dict[str, str] = {}
            if self.config.disaggregated:
                prefill_start = time.monotonic()
                prefill = await self._send(
                    "prefill", endpoint, _dumps(_prefill_body(body)), key=key, headers=headers, stream=False
                )
                prefill_s = time.monotonic() - prefill_start
                self.metrics.phase.labels(phase="prefill").observe(prefill_s)
                timing |= {
                    "x-kubemoe-prefill-ms": f"{prefill_s * 1e3:.1f}",
                    "x-kubemoe-prefill-backend": prefill.backend.address,
                }
                if prefill.status != 200:
                    code = prefill.status
                    return _passthrough(prefill, timing)
                params = _json_object(prefill.body).get("kv_transfer_params")
                if params:
                    body = {**body, "kv_transfer_params": params}
                    raw = _dumps(body)
                role = "decode"
            else:
                role = "worker"
            stream = body.get("stream") is True
            decode_start = time.monotonic()
            upstream = await self._send(role, endpoint, raw, key=key, headers=headers, stream=stream)
            timing[f"x-kubemoe-{role}-backend"] = upstream.backend.address
            code = upstream.status
            if upstream.body is not None or upstream.status != 200:
                if upstream.body is None:
                    upstream.body = await upstream.response.read()
                decode_s = time.monotonic() - decode_start
                self.metrics.phase.labels(phase=role).observe(decode_s)
                timing[f"x-kubemoe-{role}-ms"] = f"{decode_s * 1e3:.1f}"
                return _passthrough(upstream, timing)
            streaming = True
            return StreamingResponse(
                self._relay(upstream, start=start, decode_start=decode_start, endpoint=endpoint),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", **timing},
            )
        except ApiError as err:
            code = err.status
            return JSONResponse(err.body(), status_code=err.status)
        finally:
            if not streaming:
                self._done(endpoint=endpoint, code=code, start=start)

    def _done(self, *, endpoint: str, code: int, start: float) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(endpoint=endpoint, code=str(code)).inc()
        self.metrics.latency.observe(time.monotonic() - start)

    async def _relay(
        self, upstream: _Upstream, *, start: float, decode_start: float, endpoint: str
    ) -> AsyncIterator[bytes]:
        """Pass the decode's SSE bytes through; time the text events on the way."""
        buffer = b""
        last: float | None = None
        try:
            async for chunk in upstream.response.iter_raw():
                yield chunk
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                now = time.monotonic()
                for event in events:
                    if not _carries_text(event):
                        continue
                    if last is None:
                        self.metrics.ttft.observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
        except UpstreamError as err:  # the backend died mid-answer: the client sees a cut stream
            self.backends.eject(upstream.backend, reason=f"stream {err.kind}")
        finally:
            upstream.backend.outstanding -= 1
            await upstream.response.aclose()
            self.metrics.phase.labels(phase=upstream.backend.role).observe(time.monotonic() - decode_start)
            self._done(endpoint=endpoint, code=200, start=start)

    async def _send(
        self,
        role: str,
        endpoint: str,
        content: bytes,
        *,
        key: str,
        headers: dict[str, str],
        stream: bool,
    ) -> _Upstream:
        """POST to a backend of `role`, moving on to another one after a transport failure or a 503."""
        tried: set[str] = set()
        last: _Upstream | None = None
        for _ in range(self.config.max_attempts):
            backend = self._pick(role, key=key, exclude=tried)
            if backend is None:
                break
            tried.add(backend.address)
            backend.outstanding += 1
            keep_open = False
            try:
                response = await self.upstream.post(backend.address, endpoint, content, headers)
                if stream and response.status == 200:
                    keep_open = True  # _relay releases the backend when the stream ends
                    return _Upstream(backend, response, body=None)
                data = await response.read()
                await response.aclose()
            except UpstreamError as err:
                self.backends.eject(backend, reason=err.kind)
                continue
            finally:
                if not keep_open:
                    backend.outstanding -= 1
            last = _Upstream(backend, response, body=data)
            if response.status not in RETRY_STATUS:
                return last
            self.metrics.backend_errors.labels(
                role=role, backend=backend.address, kind=str(response.status)
            ).inc()
        if last is not None:
            return last
        raise ApiError(
            503,
            f"no healthy {role} backend answered ({len(tried)} tried)",
            type="server_error",
            code="no_backend",
        )

    def _pick(self, role: str, *, key: str, exclude: set[str]) -> Backend | None:
        candidates = [b for b in self.backends.pool(role).healthy() if b.address not in exclude]
        if not candidates:
            return None
        return candidates[self.config.policies[role].choose(candidates, key=key)]

    # --- checks -------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        keys = self.config.api_keys
        if keys is not None and not keys.allows(request.headers.get("authorization")):
            raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    def _check(self, body: dict[str, Any], *, prompt_field: str) -> None:
        if prompt_field not in body:
            raise ApiError(400, f"{prompt_field}: Field required", param=prompt_field)
        prompt = body[prompt_field]
        if prompt_field == "messages" and (not isinstance(prompt, list) or not prompt):
            raise ApiError(400, "messages: must be a non-empty list", param="messages")
        if prompt_field == "prompt" and not isinstance(prompt, str | list):
            raise ApiError(400, "prompt: must be a string or a list", param="prompt")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model: Input should be a valid string", param="model")
        if model is not None and self.config.served_names and model not in self.config.served_names:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": dict(REMOTE_DECODE)}
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill.pop("stream_options", None)
    return prefill


def _passthrough(upstream: _Upstream, timing: dict[str, str]) -> Response:
    content_type = upstream.response.headers.get("content-type", "application/json")
    return Response(
        upstream.body or b"", status_code=upstream.status, media_type=content_type, headers=timing
    )


def _json_object(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _carries_text(event: bytes) -> bool:
    """An SSE event with generated text in it (not the role opener, not [DONE], not a usage chunk)."""
    return (b'"text":"' in event and b'"text":""' not in event) or (
        b'"content":"' in event and b'"content":""' not in event
    )


def _prefix_key(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt[:PREFIX_KEY_CHARS]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        parts: list[str] = []
        for message in prompt:
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role')}:{content}")
        return "\n".join(parts)[:PREFIX_KEY_CHARS]
    return json.dumps(prompt, separators=(",", ":"))[:PREFIX_KEY_CHARS]


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def _read_json(request: Request) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and as it came (what goes upstream when the router changes nothing)."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        parts.append(part)
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    data = b"".join(parts)
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body, data


def build_router_app(router: Router) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await router.backends.start()
        try:
            yield
        finally:
            await router.backends.stop()
            await router.upstream.aclose()

    routes = [
        Route("/health", router.health, methods=["GET"]),
        Route("/ready", router.ready, methods=["GET"]),
        Route("/metrics", router.metrics_endpoint, methods=["GET"]),
        Route("/v1/models", router.models, methods=["GET"]),
        Route("/v1/completions", router.completions, methods=["POST"]),
        Route("/v1/chat/completions", router.chat_completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},  # type: ignore[dict-item]
    )


async def _http_error(_: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        ApiError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code
    )


def roles_for(*, disaggregated: bool) -> Sequence[str]:
    return ("prefill", "decode") if disaggregated else ("worker",)
