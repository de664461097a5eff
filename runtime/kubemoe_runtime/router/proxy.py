"""The router's request handling: an OpenAI-compatible front door over the engines' own servers (its
routes, and the errors it answers: app.py).

Colocated (`--worker-service`): the request goes to one worker, chosen by the policy.

Disaggregated (`--prefill-service` and `--decode-service`), vLLM's P/D proxy protocol (its
disaggregated-serving proxy examples): the request goes to a prefill with max_tokens=1, stream off and
kv_transfer_params {"do_remote_decode": true, ...}; the kv_transfer_params of its answer are added to the
original request, which goes to a decode; the decode's answer (streamed or not) is the client's. Engines
whose connector needs no parameters (vLLM's ExampleConnector: KV by prompt hash in a shared directory)
answer none, and the decode gets the request unchanged. A torch prefill keeps the KV under a handle until
the decode fetches it; when no decode will (it refused the request, none answered, the client left
first), the router has the prefill drop it at once (kv_release.py). Prompts estimated shorter than
--pd-min-prompt-tokens go to a decode alone (checks.py). As the prefill never sees the client's max_tokens,
max_completion_tokens, stream or stream_options, the router refuses itself what the engine would refuse
in them (checks.py), before any backend is asked, and signs the completion's length into the prefill's
kv_transfer_params, so that a torch prefill refuses a request too long for the context before computing.

kv_transfer_params are the router's alone: any a client sends are dropped (in both modes), and those the
router sends (to the prefill, and the prefill's answer to the decode) are signed with $KUBEMOE_KV_KEY
(pod/kv_auth.py), which the engines verify.

A request is retried on another backend of the same role when the first one refuses the connection, drops
it before answering, or answers 503 (dispatch.py); a streaming answer is never retried once its first
byte went out. Every read from a backend is bounded (--upstream-read-timeout: silence; --request-timeout:
the whole request): past either, a 504, or for a stream an error event (relay.py); every write of a
streamed answer to the client is bounded too (--client-write-timeout: a client that stopped reading has
its answer given up, relay.py). A client that goes away before a non-streaming answer has its upstream
request cancelled (the connection closed, which the engine sees as its client leaving). At the router's
drain deadline what is still in flight, a body still being uploaded too, is answered 503 there and then
(in_flight.py). The router checks only what it must read (checks.py); the engines validate the rest and
their 4xx answers pass through unchanged.

Forwarded paths (vLLM's /v1/embeddings, /v1/responses, /tokenize, /version, ...) go to a backend the role's
policy picks, keyed by the body's prompt, messages or input: colocated, any healthy worker; disaggregated,
a decode (it holds the whole model and prefills what it is sent without a hand-off; a prefill is only ever
asked for KV). The API key is checked as for the completions; the body is read whole first (at most
checks.MAX_BODY_BYTES), so that another backend can be tried as for the completions; the answer is relayed
as it arrives (relay.py). HEAD is refused (405), as vLLM does. A forwarded request counts in
kubemoe_router_requests_total{endpoint="/tokenize"|"/detokenize"|"/version"|"/v1/*"} and in flight, not in
the request latency histogram (the completions').
Answers carry timing headers: x-kubemoe-prefill-ms / x-kubemoe-decode-ms (P/D) and the backends used.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.pod.disconnect import ClientGone, Ended, unless_disconnected, unless_ended
from kubemoe_runtime.pod.kv_auth import DECODE_MAX_TOKENS, KV_KEY_ENV, KVSigner
from kubemoe_runtime.pod.openai_responses import ModelList
from kubemoe_runtime.router.auth import ApiKeys
from kubemoe_runtime.router.backends import Backends
from kubemoe_runtime.router.checks import (
    ENGINE_PATHS,
    authorize,
    check_generation,
    check_prefill_fields,
    completion_limit,
    dumps,
    forward_key,
    json_object,
    not_forwarded,
    prefix_key,
    prompt_tokens_estimate,
    read_body,
    read_json,
)
from kubemoe_runtime.router.dispatch import Dispatcher
from kubemoe_runtime.router.in_flight import InFlight, drain_deadline_error
from kubemoe_runtime.router.kv_release import KVReleaser, held_handle
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.models import ModelCards
from kubemoe_runtime.router.policies import Policy
from kubemoe_runtime.router.relay import (
    CLIENT_GONE,
    NOT_SENT_BACK,
    NOT_SENT_UP,
    WRITE_TIMEOUT_S,
    Done,
    RelayResponse,
    error_response,
    passthrough,
    pipe,
    relay_sse,
)
from kubemoe_runtime.router.upstream import READ_TIMEOUT_S, Upstream, UpstreamTimeout

REQUEST_TIMEOUT_S = 1800.0  # a request's deadline, streaming included
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def ended_early(err: ApiError | UpstreamTimeout | ClientGone | Ended) -> Response:
    """The router's own answer to a request that ended in `err` before a backend's answer went out: its
    OpenAI-shaped error (a backend's silence past the deadline a 504, the drain deadline a 503), or an
    empty 499 for a client that left (no one reads it)."""
    if isinstance(err, ClientGone):
        return Response(status_code=CLIENT_GONE)
    if isinstance(err, UpstreamTimeout):
        err = ApiError(504, str(err), type="server_error", code="timeout")
    elif isinstance(err, Ended):
        err = drain_deadline_error()
    return error_response(err)


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
    write_timeout: float = WRITE_TIMEOUT_S  # the most seconds a client may take none of a streamed answer
    pd_min_prompt_tokens: int = 0
    """Disaggregated: prompts estimated shorter than this go to a decode alone, which prefills them
    itself (P/D's KV hand-off costs more than it saves on a short prompt). 0: every prompt P/D."""
    created: int = field(default_factory=lambda: int(time.time()))


class Router:
    def __init__(self, config: RouterConfig, *, backends: Backends, metrics: RouterMetrics) -> None:
        self.config = config
        self.backends = backends
        self.metrics = metrics
        self.upstream = Upstream(connect_timeout=5.0, read_timeout=config.read_timeout)
        self.dispatch = Dispatcher(
            backends=backends,
            policies=config.policies,
            upstream=self.upstream,
            max_attempts=config.max_attempts,
        )
        self.model_cards = ModelCards(
            self.dispatch, role=self.forward_role, served_names=config.served_names, created=config.created
        )
        self.kv_releases = KVReleaser(self.upstream)
        self.in_flight = InFlight()

    def end_in_flight(self) -> None:
        """At the drain deadline (pod/drain.py's on_timeout): answer every request in flight now, 503
        (in_flight.py). On the event loop's thread."""
        self.in_flight.end_all()

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
        authorize(self.config.api_keys, request)
        return JSONResponse(ModelList(data=await self.model_cards.cards()).model_dump())

    async def model(self, request: Request) -> Response:
        authorize(self.config.api_keys, request)
        name = request.path_params["model"]
        card = next((c for c in await self.model_cards.cards() if c.id == name), None)
        if card is None:
            shown = name if len(name) <= 256 else f"{name[:256]}..."
            raise ApiError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

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
            authorize(self.config.api_keys, request)
            body = await unless_ended(read_body(request), self.in_flight.ended())
            raw_path = request.scope.get("raw_path")
            target = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else path
            if query := request.scope.get("query_string", b""):
                target += "?" + query.decode("latin-1")
            headers = {k: v for k, v in request.headers.items() if k not in NOT_SENT_UP}
            headers.setdefault("x-request-id", uuid.uuid4().hex)
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
            role = self.forward_role
            work = self.dispatch.send(
                role,
                body,
                method=request.method,
                endpoint=target,
                key=forward_key(body, request.headers.get("content-type", "")),
                headers=headers,
                stream=True,
                relay_any_status=True,
                deadline=deadline,
            )
            upstream = await unless_disconnected(request, work, ended=self.in_flight.ended())
            code = upstream.status
            back = {k: v for k, v in upstream.response.headers.items() if k not in NOT_SENT_BACK}
            back[f"x-kubemoe-{role}-backend"] = upstream.backend.address
            if upstream.body is not None:
                response = Response(upstream.body, status_code=upstream.status, headers=back)
            else:
                relay = functools.partial(
                    pipe,
                    upstream,
                    backends=self.backends,
                    in_flight=self.in_flight,
                    done=self._counter(endpoint, start, latency=False),
                )
                response = RelayResponse(
                    relay, write_timeout=self.config.write_timeout, status_code=upstream.status, headers=back
                )
            return response
        except (ApiError, UpstreamTimeout, ClientGone, Ended) as err:
            response = ended_early(err)
            code = response.status_code
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # else pipe counts it when the answer ends
                self._done(endpoint=endpoint, code=code, start=start, latency=False)

    # --- the proxy ----------------------------------------------------------------------------------

    async def _generate(self, request: Request, *, endpoint: str, prompt_field: str) -> Response:
        start = time.monotonic()
        self.metrics.in_flight.inc()
        response: Response | None = None
        code = 500
        try:
            authorize(self.config.api_keys, request)
            body, raw = await unless_ended(read_json(request), self.in_flight.ended())
            check_generation(body, prompt_field=prompt_field, served_names=self.config.served_names)
            if self.config.disaggregated:  # the prefill's request overwrites these: check them here
                check_prefill_fields(body, chat=prompt_field == "messages")
            if "kv_transfer_params" in body:  # only the router sets them (and signs them: pod/kv_auth.py)
                del body["kv_transfer_params"]
                raw = dumps(body)  # not the bytes: they may hold the key twice, under any spelling
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
            response = await unless_disconnected(request, work, ended=self.in_flight.ended())
            code = response.status_code
            return response
        except (ApiError, UpstreamTimeout, ClientGone, Ended) as err:
            response = ended_early(err)
            code = response.status_code
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # else relay_sse counts it when the stream ends
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
        it answered, signed) a decode's; the prefill's KV released if the decode does not take it."""
        key = prefix_key(body.get(prompt_field))
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"content-type": "application/json", "x-request-id": request_id}
        timing: dict[str, str] = {}
        send = functools.partial(
            self.dispatch.send, endpoint=endpoint, key=key, headers=headers, deadline=deadline
        )
        decode_only = self.config.disaggregated and (
            prompt_tokens_estimate(body.get(prompt_field)) < self.config.pd_min_prompt_tokens
        )
        if self.config.disaggregated:
            path = "decode_only" if decode_only else "prefill_decode"
            self.metrics.pd_path.labels(path=path).inc()
            timing["x-kubemoe-path"] = path
        held: tuple[str, str] | None = None  # the prefill's address and the handle of the KV it keeps
        if decode_only:
            role = "decode"
        elif self.config.disaggregated:
            prefill_start = time.monotonic()
            prefill_body = self._prefill_body(body, chat=prompt_field == "messages")
            prefill = await send("prefill", dumps(prefill_body), stream=False)
            prefill_s = time.monotonic() - prefill_start
            self.metrics.phase.labels(phase="prefill").observe(prefill_s)
            timing |= {
                "x-kubemoe-prefill-ms": f"{prefill_s * 1e3:.1f}",
                "x-kubemoe-prefill-backend": prefill.backend.address,
            }
            if prefill.status != 200:
                return passthrough(prefill, timing)
            params = json_object(prefill.body).get("kv_transfer_params")
            if params and isinstance(params, dict):
                body = {**body, "kv_transfer_params": self._signer().sign(params)}
                raw = dumps(body)
                if (handle := held_handle(params)) is not None:
                    held = (prefill.backend.address, handle)
            role = "decode"
        else:
            role = "worker"
        stream = body.get("stream") is True
        decode_start = time.monotonic()
        try:
            upstream = await send(role, raw, stream=stream)
        except BaseException as err:  # none answered, a timeout, the client gone (cancelled)
            if held is not None:
                gone = isinstance(err, asyncio.CancelledError)
                self._release(held, why="the client left" if gone else f"no decode: {type(err).__name__}")
            raise
        if held is not None and not 200 <= upstream.status < 300:
            self._release(held, why=f"the decode answered {upstream.status}")
        timing[f"x-kubemoe-{role}-backend"] = upstream.backend.address
        if upstream.body is not None:
            decode_s = time.monotonic() - decode_start
            self.metrics.phase.labels(phase=role).observe(decode_s)
            timing[f"x-kubemoe-{role}-ms"] = f"{decode_s * 1e3:.1f}"
            return passthrough(upstream, timing)
        relay = functools.partial(
            relay_sse,
            upstream,
            backends=self.backends,
            in_flight=self.in_flight,
            metrics=self.metrics,
            start=start,
            decode_start=decode_start,
            done=self._counter(endpoint, start),
        )
        return RelayResponse(
            relay,
            write_timeout=self.config.write_timeout,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **timing},
        )

    def _release(self, held: tuple[str, str], *, why: str) -> None:
        """Have the prefill drop the KV no decode will fetch (kv_release.py), in the background."""
        address, handle = held
        self.kv_releases.release(self._signer(), address, handle, why=why)

    def _signer(self) -> KVSigner:
        if self.config.kv_signer is None:
            raise ApiError(
                500,
                f"the router has no key to sign the KV hand-off ({KV_KEY_ENV})",
                type="server_error",
                code="kv_key_missing",
            )
        return self.config.kv_signer

    def _prefill_body(self, body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        """The request for a prefill: one token, not streamed, its KV kept for the decode. The client's
        own completion length goes along (signed, as DECODE_MAX_TOKENS) so that a torch prefill refuses,
        before computing anything, a request the decode would refuse for its length."""
        wanted = completion_limit(body, chat=chat)
        extra = {DECODE_MAX_TOKENS: wanted} if type(wanted) is int and wanted > 0 else {}
        params = self._signer().sign({**REMOTE_DECODE, **extra})
        prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        prefill.pop("stream_options", None)
        return prefill

    def _counter(self, endpoint: str, start: float, *, latency: bool = True) -> Done:
        """`_done` for a relayed answer, which knows its final status only once it has ended."""
        return lambda code: self._done(endpoint=endpoint, code=code, start=start, latency=latency)

    def _done(self, *, endpoint: str, code: int, start: float, latency: bool = True) -> None:
        """Count a finished request; `latency`: in the request latency histogram too (the completions'; a
        forwarded /version or /tokenize would only blur it)."""
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(endpoint=endpoint, code=str(code)).inc()
        if latency:
            self.metrics.latency.observe(time.monotonic() - start)


def roles_for(*, disaggregated: bool) -> Sequence[str]:
    return ("prefill", "decode") if disaggregated else ("worker",)
