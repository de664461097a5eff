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

kv_transfer_params are the router's alone: any a client sends are dropped (in both modes), and those the
router sends (to the prefill, and the prefill's answer to the decode) are signed with $KUBEMOE_KV_KEY
(pod/kv_auth.py), which the engines verify.

A request is retried on another backend of the same role when the first one refuses the connection, drops
it before answering, or answers 503 (that backend is ejected at once, until a health probe passes); a
streaming answer is never retried once its first byte went out. Every read from a backend is bounded
(--upstream-read-timeout: silence; --request-timeout: the whole request): past either, a 504, or for a
stream an error event. A stream passes through as whole SSE events; one the backend cuts (it died, went
quiet, or ended without `data: [DONE]`) ends with an OpenAI-shaped error event `data: {"error": {...}}`
and `data: [DONE]`, not a silent truncation. A client that goes away before a non-streaming answer has
its upstream request cancelled (the connection closed, which the engine sees as its client leaving).
The router checks only what it must read (a JSON object, the prompt or messages, `stream`, the model
name); the engines validate the rest and their 4xx answers pass through unchanged.
Answers carry timing headers: x-kubemoe-prefill-ms / x-kubemoe-decode-ms (P/D) and the backends used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

from kubemoe_runtime.pod.disconnect import ClientGone, unless_disconnected
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVSigner
from kubemoe_runtime.pod.protocol import ApiError, ModelCard, ModelList
from kubemoe_runtime.router.auth import ApiKeys
from kubemoe_runtime.router.backends import Backend, Backends
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.policies import Policy
from kubemoe_runtime.router.upstream import (
    READ_TIMEOUT_S,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)

MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_KEY_CHARS = 512  # what prefix-hash hashes: the start of the prompt
RETRY_STATUS = frozenset({502, 503, 504})
REQUEST_TIMEOUT_S = 1800.0  # a request's deadline, streaming included
CLIENT_GONE = 499  # counted for a request whose client left before its answer
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
    kv_signer: KVSigner | None = None  # signs the kv_transfer_params it sends (disaggregated)
    read_timeout: float = READ_TIMEOUT_S  # the most seconds a backend may send nothing
    request_timeout: float = REQUEST_TIMEOUT_S
    pd_min_prompt_tokens: int = 0
    """Disaggregated: prompts estimated shorter than this go to a decode alone, which prefills them
    itself (P/D's KV hand-off costs more than it saves on a short prompt). 0: every prompt P/D."""
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
        self.upstream = Upstream(connect_timeout=5.0, read_timeout=config.read_timeout)

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
        response: Response | None = None
        code = 500
        try:
            self._authorize(request)
            body, raw = await _read_json(request)
            self._check(body, prompt_field=prompt_field)
            if body.pop("kv_transfer_params", None) is not None:
                raw = _dumps(body)  # only the router sets them (and signs them: pod/kv_auth.py)
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
            work = self._forward(
                request,
                body,
                raw,
                endpoint=endpoint,
                prompt_field=prompt_field,
                start=start,
                deadline=deadline,
            )
            response = await unless_disconnected(request, work)
            code = response.status_code
            return response
        except ApiError as err:
            code = err.status
            return JSONResponse(err.body(), status_code=err.status)
        except UpstreamTimeout as err:
            code = 504
            error = ApiError(504, str(err), type="server_error", code="timeout")
            return JSONResponse(error.body(), status_code=504)
        except ClientGone:
            code = CLIENT_GONE
            return Response(status_code=CLIENT_GONE)
        finally:
            if not isinstance(response, StreamingResponse):  # else _relay counts it when the stream ends
                self._done(endpoint=endpoint, code=code, start=start)

    async def _forward(
        self,
        request: Request,
        body: dict[str, Any],
        raw: bytes,
        *,
        endpoint: str,
        prompt_field: str,
        start: float,
        deadline: float,
    ) -> Response:
        """Colocated: one worker's answer. Disaggregated: a prefill's, then (with the kv_transfer_params
        it answered, signed) a decode's."""
        key = _prefix_key(body.get(prompt_field))
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"content-type": "application/json", "x-request-id": request_id}
        timing: dict[str, str] = {}
        send = functools.partial(self._send, endpoint=endpoint, key=key, headers=headers, deadline=deadline)
        decode_only = self.config.disaggregated and (
            prompt_tokens_estimate(body.get(prompt_field)) < self.config.pd_min_prompt_tokens
        )
        if self.config.disaggregated:
            path = "decode_only" if decode_only else "prefill_decode"
            self.metrics.pd_path.labels(path=path).inc()
            timing["x-kubemoe-path"] = path
        if decode_only:
            role = "decode"
        elif self.config.disaggregated:
            prefill_start = time.monotonic()
            prefill = await send("prefill", _dumps(self._prefill_body(body)), stream=False)
            prefill_s = time.monotonic() - prefill_start
            self.metrics.phase.labels(phase="prefill").observe(prefill_s)
            timing |= {
                "x-kubemoe-prefill-ms": f"{prefill_s * 1e3:.1f}",
                "x-kubemoe-prefill-backend": prefill.backend.address,
            }
            if prefill.status != 200:
                return _passthrough(prefill, timing)
            params = _json_object(prefill.body).get("kv_transfer_params")
            if params and isinstance(params, dict):
                body = {**body, "kv_transfer_params": self._signer().sign(params)}
                raw = _dumps(body)
            role = "decode"
        else:
            role = "worker"
        stream = body.get("stream") is True
        decode_start = time.monotonic()
        upstream = await send(role, raw, stream=stream)
        timing[f"x-kubemoe-{role}-backend"] = upstream.backend.address
        if upstream.body is not None:
            decode_s = time.monotonic() - decode_start
            self.metrics.phase.labels(phase=role).observe(decode_s)
            timing[f"x-kubemoe-{role}-ms"] = f"{decode_s * 1e3:.1f}"
            return _passthrough(upstream, timing)
        return StreamingResponse(
            self._relay(upstream, start=start, decode_start=decode_start, endpoint=endpoint),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **timing},
        )

    def _signer(self) -> KVSigner:
        if self.config.kv_signer is None:
            raise ApiError(
                500,
                f"the router has no key to sign the KV hand-off ({KV_KEY_ENV})",
                type="server_error",
                code="kv_key_missing",
            )
        return self.config.kv_signer

    def _prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request for a prefill: one token, not streamed, its KV kept for the decode."""
        params = self._signer().sign(REMOTE_DECODE)
        prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        prefill.pop("stream_options", None)
        return prefill

    def _done(self, *, endpoint: str, code: int, start: float) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(endpoint=endpoint, code=str(code)).inc()
        self.metrics.latency.observe(time.monotonic() - start)

    async def _relay(
        self, upstream: _Upstream, *, start: float, decode_start: float, endpoint: str
    ) -> AsyncIterator[bytes]:
        """Pass the decode's SSE events through (whole events: a cut one is never sent), timing the text
        events on the way. A backend that fails, goes quiet, or ends without `data: [DONE]` gets an
        OpenAI-shaped error event, then [DONE], where the rest of the answer would be."""
        buffer = b""
        last: float | None = None
        done = False
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
                        done = done or event.startswith(b"data: [DONE]")
                        if not _carries_text(event):
                            continue
                        if last is None:
                            self.metrics.ttft.observe(now - start)
                        else:
                            self.metrics.itl.observe(now - last)
                        last = now
                    yield b"".join(event + b"\n\n" for event in events)
                if buffer.strip():  # a last event without its blank line
                    done = done or buffer.startswith(b"data: [DONE]")
                    yield buffer.rstrip(b"\n") + b"\n\n"
                if not done:
                    error = _stream_error(
                        "the backend's stream ended without `data: [DONE]`", "backend_failed"
                    )
            except UpstreamError as err:  # the backend died mid-answer
                self.backends.eject(upstream.backend, reason=f"stream {err.kind}")
                error = _stream_error(f"the backend failed mid-answer: {err}", "backend_failed")
            except UpstreamTimeout as err:
                error = _stream_error(str(err), "timeout")
            if error is not None:
                code = error.status
                yield f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
        finally:
            upstream.backend.outstanding -= 1
            await upstream.response.aclose()
            self.metrics.phase.labels(phase=upstream.backend.role).observe(time.monotonic() - decode_start)
            self._done(endpoint=endpoint, code=code, start=start)

    async def _send(
        self,
        role: str,
        content: bytes,
        *,
        endpoint: str,
        key: str,
        headers: dict[str, str],
        stream: bool,
        deadline: float,
    ) -> _Upstream:
        """POST to a backend of `role`, moving on to another one after a transport failure or a 503 (either
        ejects the backend at once: it is down, terminating or overloaded; a health probe re-admits it)."""
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
                response = await self.upstream.post(
                    backend.address, endpoint, content, headers, deadline=deadline
                )
                if stream and response.status == 200:
                    keep_open = True  # _relay releases the backend when the stream ends
                    return _Upstream(backend, response, body=None)
                try:
                    data = await response.read()
                finally:  # closed unless read to its end (a timeout, the client gone)
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
            if response.status == 503:
                self.backends.eject(backend, reason="503")
            else:
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


def prompt_tokens_estimate(prompt: Any) -> int:
    """A prompt's tokens, without a tokenizer: exact for token ids, else UTF-8 bytes / 4 (about what
    BPE vocabularies give English text; code and other scripts give more tokens per byte, so the
    estimate errs towards P/D). Messages count their text parts."""
    if isinstance(prompt, str):
        return len(prompt.encode()) // 4
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(prompt_tokens_estimate(_text_of(item)) for item in prompt)
    return 0


def _text_of(item: Any) -> Any:
    """A message's content (a string, or the text of its parts), or a batch entry as it is."""
    if not isinstance(item, dict):
        return item
    content = item.get("content")
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def _passthrough(upstream: _Upstream, timing: dict[str, str]) -> Response:
    content_type = upstream.response.headers.get("content-type", "application/json")
    return Response(
        upstream.body or b"", status_code=upstream.status, media_type=content_type, headers=timing
    )


def _stream_error(message: str, code: str) -> ApiError:
    return ApiError(502 if code == "backend_failed" else 504, message, type="server_error", code=code)


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
        # ApiError: what a handler raises outside _generate (GET /v1/models without a key: a 401, not a 500)
        exception_handlers={HTTPException: _http_error, ApiError: _api_error},  # type: ignore[dict-item]
    )


async def _api_error(_: Request, err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(_: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        ApiError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code
    )


def roles_for(*, disaggregated: bool) -> Sequence[str]:
    return ("prefill", "decode") if disaggregated else ("worker",)
