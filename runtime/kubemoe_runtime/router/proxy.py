"""The router's HTTP app: an OpenAI-compatible front door over the engines' own servers.

    GET  /health                200 while the router runs
    GET  /ready                 200 once every role has a healthy backend, else 503
    GET  /metrics               the router's Prometheus series (metrics.py)
    GET  /v1/models             the served model names, with the backends' max_model_len (asked of one
                                and kept for MODELS_TTL_S, as the operator does not pass it to the router;
                                null until a backend has answered)
    GET  /v1/models/{model}     one of them (404 for another name)
    POST /v1/completions        proxied; streaming (SSE, passed through byte for byte) or not
    POST /v1/chat/completions   proxied likewise
    any  /v1/*, /tokenize,      forwarded to one backend (`forward`): GET, POST, PUT, PATCH or DELETE,
         /detokenize, /version  the path and query as sent, the answer (status, headers, body) streamed
                                back as it comes; what the backend does not serve is its own 404
    any  /v1/experts/*, /v1/kv/*  404: not forwarded (the operator's expert load and placement; the KV
                                hand-off between pods). Nor are the backends' /metrics, /ready, /health.

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
name); the engines validate the rest and their 4xx answers pass through unchanged (the torch engine
refuses the options it does not implement, naming them: pod/protocol.py).

Forwarded paths (vLLM's /v1/embeddings, /v1/responses, /tokenize, /version, ...) go to a backend the role's
policy picks, keyed by the body's prompt, messages or input: colocated, any healthy worker; disaggregated,
a decode (it holds the whole model and prefills what it is sent without a hand-off; a prefill is only ever
asked for KV). The API key is checked as for the completions; the request body is read whole first, up to
the same MAX_BODY_BYTES (413 past it), so that a backend which refuses the connection or answers 503 can
be replaced by another as for the completions; the answer is not read first but relayed as it arrives
(SSE included), under the same read timeout and deadline. A backend that fails mid-answer ends an SSE
answer with an error event, and any other answer with a broken connection (never a silent truncation).
HEAD is refused (405), as vLLM does. Headers go up except hop-by-hop ones, Host, Authorization (the
router's key), Cookie and Accept-Encoding (the answer comes back unencoded). A forwarded request counts in
kubemoe_router_requests_total{endpoint="/tokenize"|"/detokenize"|"/version"|"/v1/*"} and in flight, not in
the request latency histogram (the completions').
Answers carry timing headers: x-kubemoe-prefill-ms / x-kubemoe-decode-ms (P/D) and the backends used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import posixpath
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
from starlette.types import Send

from kubemoe_runtime.pod.disconnect import ClientGone, unless_disconnected
from kubemoe_runtime.pod.kv_auth import DECODE_MAX_TOKENS, KV_KEY_ENV, KVSigner
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

log = logging.getLogger("kubemoe_runtime.router")
MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_KEY_CHARS = 512  # what prefix-hash hashes: the start of the prompt
RETRY_STATUS = frozenset({502, 503, 504})
REQUEST_TIMEOUT_S = 1800.0  # a request's deadline, streaming included
CLIENT_GONE = 499  # counted for a request whose client left before its answer
MODELS_TTL_S = 30.0  # how long a backend's max_model_len is kept before it is asked again
MODELS_PROBE_S = 5.0  # the most a backend may take to answer the router's own GET /v1/models
ENGINE_PATHS = ("/tokenize", "/detokenize", "/version")  # vLLM's, outside /v1: forwarded
NOT_FORWARDED = ("/v1/experts", "/v1/kv")  # the operator's expert load and placement; the KV hand-off
FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade", "content-length", "host"}
)
_NOT_SENT_UP = _HOP_BY_HOP | {"authorization", "cookie", "expect", "accept-encoding"}
_NOT_SENT_BACK = _HOP_BY_HOP | {"date", "server"}  # the router's own server writes those
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
        self._max_model_len: int | None = None
        self._max_model_len_at = 0.0
        self._max_model_len_lock = asyncio.Lock()

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
        return JSONResponse(ModelList(data=await self._cards()).model_dump())

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model"]
        card = next((c for c in await self._cards() if c.id == name), None)
        if card is None:
            shown = name if len(name) <= 256 else f"{name[:256]}..."
            raise ApiError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

    async def _cards(self) -> list[ModelCard]:
        max_model_len = await self.max_model_len()
        return [
            ModelCard(id=name, created=self.config.created, root=name, max_model_len=max_model_len)
            for name in self.config.served_names
        ]

    async def max_model_len(self) -> int | None:
        """The backends' max_model_len, from a backend's own /v1/models, kept MODELS_TTL_S; while no backend
        answers, the last one learned (None, shown as null, until one has)."""
        async with self._max_model_len_lock:
            if self._max_model_len is None or time.monotonic() - self._max_model_len_at >= MODELS_TTL_S:
                learned = await self._ask_max_model_len()
                if learned is not None:
                    self._max_model_len, self._max_model_len_at = learned, time.monotonic()
            return self._max_model_len

    async def _ask_max_model_len(self) -> int | None:
        role = self.forward_role
        tried: set[str] = set()
        for _ in range(self.config.max_attempts):
            backend = self._pick(role, key="", exclude=tried)
            if backend is None:
                return None
            tried.add(backend.address)
            deadline = asyncio.get_running_loop().time() + MODELS_PROBE_S
            try:
                response = await self.upstream.request(
                    "GET",
                    backend.address,
                    "/v1/models",
                    b"",
                    {"accept": "application/json"},
                    deadline=deadline,
                )
                try:
                    data = await response.read()
                finally:
                    await response.aclose()
            except (UpstreamError, UpstreamTimeout) as err:
                log.warning("router: GET /v1/models of %s failed: %s", backend.address, err)
                continue
            if response.status == 200 and (found := _max_model_len(data, self.config.served_names)):
                return found
            log.warning(
                "router: %s's /v1/models (%d) names no max_model_len", backend.address, response.status
            )
        return None

    @property
    def forward_role(self) -> str:
        """Where a forwarded request goes: disaggregated, a decode (it holds the whole model and serves a
        request alone, prefilling it itself); colocated, a worker."""
        return "decode" if self.config.disaggregated else "worker"

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, endpoint="/v1/completions", prompt_field="prompt")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, endpoint="/v1/chat/completions", prompt_field="messages")

    async def forward(self, request: Request) -> Response:
        """Any other /v1/* path, and the engine paths: to one backend, the answer streamed back."""
        path = request.url.path
        if not_forwarded(path):
            raise ApiError(
                404,
                f"{path[:200]} is not served through the router (the operator's and the pods' own path)",
                type="not_found_error",
            )
        if request.method == "HEAD":
            raise ApiError(405, "HEAD is not forwarded; use GET")
        endpoint = path if path in ENGINE_PATHS else "/v1/*"  # bounded label values
        start = time.monotonic()
        self.metrics.in_flight.inc()
        response: Response | None = None
        code = 500
        try:
            self._authorize(request)
            body = await _read_body(request)
            raw_path = request.scope.get("raw_path")
            target = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else path
            if query := request.scope.get("query_string", b""):
                target += "?" + query.decode("latin-1")
            headers = {k: v for k, v in request.headers.items() if k not in _NOT_SENT_UP}
            headers.setdefault("x-request-id", uuid.uuid4().hex)
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
            role = self.forward_role
            work = self._send(
                role,
                body,
                method=request.method,
                endpoint=target,
                key=_forward_key(body, request.headers.get("content-type", "")),
                headers=headers,
                stream=True,
                relay_any_status=True,
                deadline=deadline,
            )
            upstream = await unless_disconnected(request, work)
            code = upstream.status
            back = {k: v for k, v in upstream.response.headers.items() if k not in _NOT_SENT_BACK}
            back[f"x-kubemoe-{role}-backend"] = upstream.backend.address
            if upstream.body is not None:
                response = Response(upstream.body, status_code=upstream.status, headers=back)
            else:
                response = _CutStreamingResponse(
                    self._pipe(upstream, endpoint=endpoint, start=start),
                    status_code=upstream.status,
                    headers=back,
                )
            return response
        except ApiError as err:
            code = err.status
            return _error(err)
        except UpstreamTimeout as err:
            code = 504
            return _error(ApiError(504, str(err), type="server_error", code="timeout"))
        except ClientGone:
            code = CLIENT_GONE
            return Response(status_code=CLIENT_GONE)
        finally:
            if not isinstance(response, StreamingResponse):  # else _pipe counts it when the answer ends
                self._done(endpoint=endpoint, code=code, start=start, latency=False)

    async def _pipe(self, upstream: _Upstream, *, endpoint: str, start: float) -> AsyncIterator[bytes]:
        """A forwarded answer's body as it comes. A backend that fails or goes quiet mid-answer ends an SSE
        answer with an OpenAI-shaped error event, and any other answer by breaking the connection (raising:
        the client sees the body cut, never a complete-looking answer)."""
        code = upstream.status
        sse = upstream.response.headers.get("content-type", "").startswith("text/event-stream")
        try:
            try:
                async for chunk in upstream.response.iter_raw():
                    yield chunk
            except (UpstreamError, UpstreamTimeout) as err:
                if isinstance(err, UpstreamError):
                    self.backends.eject(upstream.backend, reason=f"stream {err.kind}")
                    error = _stream_error(f"the backend failed mid-answer: {err}", "backend_failed")
                else:
                    error = _stream_error(str(err), "timeout")
                code = error.status
                if not sse:
                    log.warning("router: %s; the client's connection is closed", error.detail.message)
                    raise _Cut from err
                yield f"\n\ndata: {json.dumps(error.body(), separators=(',', ':'))}\n\n".encode()
        finally:
            upstream.backend.outstanding -= 1
            await upstream.response.aclose()
            self._done(endpoint=endpoint, code=code, start=start, latency=False)

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
            if "kv_transfer_params" in body:  # only the router sets them (and signs them: pod/kv_auth.py)
                del body["kv_transfer_params"]
                raw = _dumps(body)  # not the bytes: they may hold the key twice, under any spelling
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
            return _error(err)
        except UpstreamTimeout as err:
            code = 504
            return _error(ApiError(504, str(err), type="server_error", code="timeout"))
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
        """The request for a prefill: one token, not streamed, its KV kept for the decode. The client's
        own max_tokens goes along (signed, as DECODE_MAX_TOKENS) so that a torch prefill refuses, before
        computing anything, a request the decode would refuse for its length."""
        wanted = body.get("max_completion_tokens", body.get("max_tokens"))
        extra = {DECODE_MAX_TOKENS: wanted} if type(wanted) is int and wanted > 0 else {}
        params = self._signer().sign({**REMOTE_DECODE, **extra})
        prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        prefill.pop("stream_options", None)
        return prefill

    def _done(self, *, endpoint: str, code: int, start: float, latency: bool = True) -> None:
        """Count a finished request; `latency`: in the request latency histogram too (the completions'; a
        forwarded /version or /tokenize would only blur it)."""
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(endpoint=endpoint, code=str(code)).inc()
        if latency:
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
        method: str = "POST",
        relay_any_status: bool = False,
    ) -> _Upstream:
        """POST (or `method`) to a backend of `role`, moving on to another one after a transport failure or
        a 503 (either ejects the backend at once: it is down, terminating or overloaded; a health probe
        re-admits it). `stream`: a 200 answer comes back open, its body unread (and, `relay_any_status`, any
        answer not retried)."""
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
                response = await self.upstream.request(
                    method, backend.address, endpoint, content, headers, deadline=deadline
                )
                if stream and (
                    response.status == 200 or (relay_any_status and response.status not in RETRY_STATUS)
                ):
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
                self.backends.count_error(backend, kind=str(response.status))
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
        if body.get("stream") is not None and not isinstance(body["stream"], bool):  # null: the default
            raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model: Input should be a valid string", param="model")
        if model is not None and self.config.served_names and model not in self.config.served_names:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def prompt_tokens_estimate(prompt: Any, *, nested: bool = False) -> int:
    """A prompt's tokens, without a tokenizer: exact for token ids, else UTF-8 bytes / 4 (about what
    BPE vocabularies give English text; code and other scripts give more tokens per byte, so the
    estimate errs towards P/D). Messages count their text parts. A list in a list is a batch entry
    (token ids); deeper lists are no prompt and count nothing (the engine refuses them)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass")) // 4  # a lone surrogate counts too
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if nested:
            return 0
        return sum(prompt_tokens_estimate(_text_of(item), nested=True) for item in prompt)
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
    except (ValueError, RecursionError):  # not JSON, not UTF-8/16/32, huge numbers, deep nesting
        return {}
    return value if isinstance(value, dict) else {}


def _carries_text(event: bytes) -> bool:
    """An SSE event with generated text in it (not the role opener, not [DONE], not a usage chunk)."""
    return (b'"text":"' in event and b'"text":""' not in event) or (
        b'"content":"' in event and b'"content":""' not in event
    )


def _prefix_key(prompt: Any) -> str:
    """What prefix-hash hashes: the prompt's start; "" (no affinity) for one nested too deeply to show."""
    try:
        return _prefix_text(prompt)
    except RecursionError:
        return ""


def _prefix_text(prompt: Any) -> str:
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
    try:
        return json.dumps(body, separators=(",", ":")).encode()
    except RecursionError as err:  # parsed a few frames up the stack, but too deep to write out here
        raise ApiError(400, "the body is nested too deeply") from err


class _Cut(Exception):
    """A forwarded answer's backend failed mid-body: the client's connection is to be closed."""


class _CutStreamingResponse(StreamingResponse):
    """A forwarded answer, relayed as it comes; one cut mid-body (`_Cut`) ends without its last chunk, the
    connection closed (uvicorn: "returned without completing response"), so the client sees it cut."""

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except _Cut:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def not_forwarded(path: str) -> bool:
    """A path the router never forwards: under NOT_FORWARDED, however spelt (`/v1//experts/../experts`)."""
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return any(p == root or p.startswith(root + "/") for p in (path, normal) for root in NOT_FORWARDED)


def _max_model_len(data: bytes, names: Sequence[str]) -> int | None:
    """max_model_len from a /v1/models answer: the served name's card, else the first card that has one."""
    cards = _json_object(data).get("data")
    if not isinstance(cards, list):
        return None
    cards = [c for c in cards if isinstance(c, dict)]
    ordered = [c for c in cards if c.get("id") in names] + cards
    for card in ordered:
        value = card.get("max_model_len")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _forward_key(body: bytes, content_type: str) -> str:
    """What prefix-hash hashes for a forwarded request: a JSON body's prompt, messages or input."""
    if "json" not in content_type or not body:
        return ""
    found = _json_object(body)
    for name in ("prompt", "messages", "input"):
        if name in found:
            return _prefix_key(found[name])
    return ""


async def _read_body(request: Request) -> bytes:
    """The body, at most MAX_BODY_BYTES (413 past it)."""
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
    return b"".join(parts)


async def _read_json(request: Request) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and as it came (what goes upstream when the router changes nothing)."""
    data = await _read_body(request)
    try:
        body = json.loads(data)
    except RecursionError as err:
        raise ApiError(400, "the body is not valid JSON: it is nested too deeply") from err
    except ValueError as err:  # not JSON, not UTF-8/16/32, a number of thousands of digits
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
    return _error(err)


async def _http_error(_: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return _error(ApiError(err.status_code, str(err.detail), type=kind))


def _error(err: ApiError) -> Response:
    """An OpenAI-shaped error, non-ASCII escaped: a message may quote what the client sent (a model name),
    a lone surrogate included, which UTF-8 (Starlette's JSONResponse) cannot carry."""
    body = json.dumps(err.body(), separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=err.status, media_type="application/json")


def roles_for(*, disaggregated: bool) -> Sequence[str]:
    return ("prefill", "decode") if disaggregated else ("worker",)
