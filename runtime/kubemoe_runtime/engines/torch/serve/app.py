"""The OpenAI-compatible HTTP API (Starlette on uvicorn) in front of the torch engine's scheduler.

    GET  /health                200 while the process and its engine thread live (500 once it failed, or
                                once it has made no progress for `stall_after_s`: group.py's Heartbeat)
    GET  /ready                 200 once every rank of the group has loaded its weights, else 503 (also
                                once the engine failed or stalled, as requests then are); while
                                loading the body is {"status": "loading", "bytes", "bytesTotal"}: what
                                this pod's first rank has read of its weights (load/load_progress.py)
    GET  /metrics               Prometheus text from the server's own registry
    GET  /v1/models             the served model names
    POST /v1/completions        text or token-id prompt; streaming (SSE) or not
    POST /v1/chat/completions   messages through the checkpoint's chat template; streaming or not
    GET  /v1/kv/{handle}        P/D: a prefilled prompt's KV (safetensors bytes), read once; HEAD 405
                                (kv/fetch.py)
    DELETE /v1/kv/{handle}      P/D: the router drops a KV no decode will fetch (signed; kv/release.py)
    GET  /v1/experts/load       tokens routed to each expert per MoE layer over a sliding window, each
                                layer's rank imbalance and slots, the placement's generation (model/
                                expert_load.py, docs/expert-load.md)
    POST /v1/experts/placement  a new expert placement for the group: 202 while it loads, 200 if it is the
                                one applied, 409 while another loads (serve/placement_switch.py)

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for malformed or
unsupported parameters and prompts longer than the context, 404 for an unknown model (as OpenAI and vLLM
answer), 503 while loading, while the waiting queue is full, or once the engine failed. Request bodies are
untrusted: every value the engine thread would act on is checked here first (pod/openai_requests.py,
prompt_limits.py, SamplingParams), so no request can stop the engine thread; a text prompt is tokenized
off the event loop and without the GIL, and one that provably cannot fit the context is refused before it
is tokenized (prompt_limits.py). kv_transfer_params are honoured only when the router signed them
(pod/kv_auth.py; 400 otherwise), and a pulled KV is checked against the model before it reaches the
scheduler (serve/kv/layout.py). A client that goes away from a non-streaming request has it aborted, as a
streaming one; a P/D prefill's caller that goes away before the answer naming the KV's handle is sent has
the KV dropped at once (no decode could fetch it; in_flight.py), rather than held for the store's ttl (one
that leaves while the answer is being sent is not seen: that KV expires).

Each request becomes a `GenerationRequest` for the scheduler, which runs on the engine thread and hands
every step's output back through `loop.call_soon_threadsafe` into the request's asyncio queue
(in_flight.py). A request submitted after the engine failed is answered 503 at once (it would wait
forever), and at the drain deadline every request still in flight is ended with a 503 (`end_in_flight`).
A P/D decode makes those checks, and the waiting queue's, before it pulls the prompt's KV as well: the
prefill hands a KV out once, so a decode that took it and then refused would cost the retry a prefill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.model.placement import PlacementError, parse_placement
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve.answer_shapes import AnswerShape, ChatShape, CompletionShape, sse
from kubemoe_runtime.engines.torch.serve.chat_template import ChatTemplateError
from kubemoe_runtime.engines.torch.serve.in_flight import InFlight, OutputQueue, Stream
from kubemoe_runtime.engines.torch.serve.kv.fetch import fetch_endpoint
from kubemoe_runtime.engines.torch.serve.kv.pull import KVPuller, KVPullError, wants_pull
from kubemoe_runtime.engines.torch.serve.kv.release import release_endpoint
from kubemoe_runtime.engines.torch.serve.placement_switch import PlacementConflict
from kubemoe_runtime.engines.torch.serve.prompt_limits import PromptLimits
from kubemoe_runtime.engines.torch.serve.request_body import parse_body, read_body
from kubemoe_runtime.engines.torch.serve.scheduler import GenerationRequest, QueueFull, Scheduler
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.pod.disconnect import ClientGone, unless_disconnected
from kubemoe_runtime.pod.kv_auth import DECODE_MAX_TOKENS, KV_KEY_ENV, KVAuthError, KVSigner
from kubemoe_runtime.pod.metrics import ServingMetrics
from kubemoe_runtime.pod.openai_requests import ChatCompletionRequest, CompletionRequest, SamplingRequest
from kubemoe_runtime.pod.openai_responses import ModelCard, ModelList

log = logging.getLogger("kubemoe_runtime.server")
MAX_PLACEMENT_BYTES = 4 * 1024 * 1024  # DeepSeek-V3's 58 layers of 256 + 256 slots: about 200 kB
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat fills the context
CLIENT_GONE = 499  # what is logged for a request whose client left (no one reads the answer)


@dataclass
class ServerState:
    """What the handlers share. `scheduler` is set by the engine thread once the group is loaded."""

    served_names: tuple[str, ...]
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer: TextTokenizer
    metrics: ServingMetrics
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    scheduler: Scheduler | None = None
    failure: str | None = None
    created: int = 0
    load_progress: LoadProgress | None = None  # this pod's rank's load, for /ready until ready
    # Once serving, the engine thread counts as stuck (/health 500) after this long without progress
    # (timeouts.py: the group's serving timeout and a margin); None: never.
    stall_after_s: float | None = None
    in_flight: InFlight = field(default_factory=InFlight)  # requests submitted and not yet answered

    def problem(self) -> str | None:
        """Why the engine cannot serve: it failed, or its thread is stuck; None while it can."""
        if self.failure is not None:
            return self.failure
        if self.scheduler is None or self.stall_after_s is None:
            return None
        return self.scheduler.leader.heartbeat.stalled(self.stall_after_s)

    def ready_scheduler(self) -> Scheduler:
        if (problem := self.problem()) is not None:
            raise ApiError(503, f"the engine failed: {problem}", type="server_error", code="engine_failed")
        if self.scheduler is None:
            raise ApiError(
                503, "the model is still loading", type="server_error", code="model_loading", retry_after=5
            )
        return self.scheduler

    def end_in_flight(self) -> int:
        """At the drain deadline: answer every request in flight 503 now, and any submitted later
        (in_flight.py); returns how many were in flight. On the event loop's thread."""
        return self.in_flight.end_all()


def build_app(state: ServerState) -> Starlette:
    api = Api(state)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/kv/{handle}", fetch_endpoint(lambda: state.ready_scheduler().kv_store), methods=["GET"]),
        Route(
            "/v1/kv/{handle}",
            release_endpoint(lambda: state.ready_scheduler().kv_store, api.signer),
            methods=["DELETE"],
        ),
        Route("/v1/experts/load", api.experts_load, methods=["GET"]),
        Route("/v1/experts/placement", api.experts_placement, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},  # type: ignore[dict-item]
    )


def health_app(
    *, is_alive: Callable[[], bool], is_ready: Callable[[], bool], progress: LoadProgress | None = None
) -> Starlette:
    """A headless pod's endpoints: it runs ranks but serves no API."""

    async def health(_: Request) -> Response:
        return PlainTextResponse("ok" if is_alive() else "failed", status_code=200 if is_alive() else 500)

    async def ready(_: Request) -> Response:
        if is_ready():
            return PlainTextResponse("ready")
        return not_ready(progress, failure=None if is_alive() else "a rank of this pod failed")

    return Starlette(routes=[Route("/health", health), Route("/ready", ready)])


def not_ready(progress: LoadProgress | None, *, failure: str | None) -> Response:
    """/ready before the group is ready: 503 with how far this pod's rank has loaded its weights, or why
    it never will be. Probes look at the status code only; people and the operator read the body."""
    if failure is not None:
        return JSONResponse({"status": "failed", "message": failure}, status_code=503)
    loaded = progress.as_json() if progress is not None else {"bytes": 0, "bytesTotal": 0}
    return JSONResponse({"status": "loading", **loaded}, status_code=503)


async def _api_error(_: Request, err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def _http_error(_: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        ApiError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code
    )


class Api:
    def __init__(self, state: ServerState, *, signer: KVSigner | None = None) -> None:
        self.state = state
        self.puller = KVPuller()
        self.signer = signer if signer is not None else KVSigner.from_env()
        self.prompts = PromptLimits(
            state.tokenizer, max_model_len=state.max_model_len, vocab_size=state.vocab_size
        )

    async def health(self, _: Request) -> Response:
        if (problem := self.state.problem()) is not None:
            return PlainTextResponse(f"engine failed: {problem}", status_code=500)
        return PlainTextResponse("ok")

    async def ready(self, _: Request) -> Response:
        problem = self.state.problem()
        if self.state.scheduler is None or problem is not None:
            return not_ready(self.state.load_progress, failure=problem)
        return PlainTextResponse("ready")

    async def metrics(self, _: Request) -> Response:
        if self.state.scheduler is not None:  # the expert-load gauges, from the window as it is now
            leader = self.state.scheduler.leader
            window = leader.runner.engine.expert_load.window(leader.switch.view().applied)
            self.state.metrics.expert_load(
                {layer: window.imbalance(i) for i, layer in enumerate(window.layers)},
                hottest_ratio=max((window.hottest_ratio(i) for i in range(len(window.layers))), default=1.0),
            )
        return Response(self.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, _: Request) -> Response:
        cards = [
            ModelCard(
                id=name,
                created=self.state.created,
                root=self.state.model_path,
                max_model_len=self.state.max_model_len,
            )
            for name in self.state.served_names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def completions(self, request: Request) -> Response:
        scheduler = self.state.ready_scheduler()
        body = await parse_body(request, CompletionRequest)
        shape = CompletionShape(model=self._model_name(body.model))
        prompt = body.single_prompt()
        prompt_ids = await self.prompts.encode(prompt, param="prompt") if isinstance(prompt, str) else prompt
        self.prompts.check(prompt_ids, param="prompt")
        generation = self._generation_request(body, prompt_ids, max_tokens=body.max_tokens, default_cap=True)
        return await self._answer(request, scheduler, generation, body=body, shape=shape)

    async def chat_completions(self, request: Request) -> Response:
        scheduler = self.state.ready_scheduler()
        body = await parse_body(request, ChatCompletionRequest)
        shape = ChatShape(model=self._model_name(body.model))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:  # CPU work (bounded inside the template sandbox): off the event loop, as /health must answer
            prompt_text = await asyncio.to_thread(self.state.tokenizer.apply_chat_template, messages)
        except ChatTemplateError as err:
            raise ApiError(400, str(err), param="messages") from err
        prompt_ids = await self.prompts.encode(prompt_text, param="messages", add_special_tokens=False)
        self.prompts.check(prompt_ids, param="messages")
        generation = self._generation_request(
            body, prompt_ids, max_tokens=body.token_limit(), default_cap=False
        )
        return await self._answer(request, scheduler, generation, body=body, shape=shape)

    async def _answer(
        self,
        request: Request,
        scheduler: Scheduler,
        generation: GenerationRequest,
        *,
        body: CompletionRequest | ChatCompletionRequest,
        shape: AnswerShape,
    ) -> Response:
        """Run `generation` (after pulling its KV, P/D) and answer in the endpoint's `shape`: a stream of
        chunks, or the whole response once done (499 when the client left first). The pulled KV is bound
        to no name here: once the scheduler has taken it into the cache, its host copy is freed."""
        self._check_admissible(scheduler)
        stream = self._submit(scheduler, await self._pull_kv(scheduler, generation))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            usage_chunk = shape.usage_chunk if include_usage else None
            return sse(stream.events(shape.chunk, first=shape.opening(), usage_chunk=usage_chunk))
        try:
            text, last = await unless_disconnected(request, stream.collect())
        except ClientGone:  # the request was aborted, and any KV parked for it is dropped (in_flight.py)
            return Response(status_code=CLIENT_GONE)
        if last.kv_transfer_params is not None and await request.is_disconnected():
            stream.drop_parked(last)  # P/D prefill: its caller left as the KV was parked (both at once)
            return Response(status_code=CLIENT_GONE)
        whole = shape.whole(text, last, kv_transfer_params=_reachable(last.kv_transfer_params, request))
        return JSONResponse(whole.model_dump())

    async def experts_load(self, _: Request) -> Response:
        """The group's expert load over the window, as rank 0 counts it (it sees every rank's routing),
        under the placement applied now."""
        leader = self.state.ready_scheduler().leader
        view = leader.switch.view()  # one snapshot: the applied placement and the one loading agree
        window = leader.runner.engine.expert_load.window(view.applied)
        return JSONResponse(window.as_json(pending_generation=view.pending_generation, error=view.error))

    async def experts_placement(self, request: Request) -> Response:
        """A new expert placement for the group (docs/expert-load.md): checked here, loaded by every rank
        in the background, switched to at one step by all of them."""
        scheduler = self.state.ready_scheduler()
        body = await read_body(request, limit=MAX_PLACEMENT_BYTES, param="body")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, 5000-digit numbers, deep nesting
            raise ApiError(400, f"the body is not a JSON placement document: {err}", param="body") from err
        engine = scheduler.leader.runner.engine
        current = engine.placement
        try:
            placement = parse_placement(
                doc,
                n_experts=current.n_experts,
                ranks=current.ranks,
                layers=current.layers,
                redundant=current.redundant,
            )
        except PlacementError as err:
            raise ApiError(400, str(err), param=err.field) from err
        try:
            state = scheduler.leader.switch.request(placement)
        except PlacementConflict as err:
            raise ApiError(409, str(err), type="conflict_error", code="placement_loading") from err
        scheduler.wake()
        return JSONResponse(
            {"generation": placement.generation, "state": state},
            status_code=202 if state == "loading" else 200,
        )

    # --- shared steps -------------------------------------------------------------------------------

    async def _pull_kv(self, scheduler: Scheduler, generation: GenerationRequest) -> GenerationRequest:
        """P/D decode: fetch the prompt's KV from the prefill named in kv_transfer_params (at most what
        the prompt's KV takes in this model). On any failure, or a KV that does not fit the model or the
        prompt, the prompt is prefilled here (slower, same answer)."""
        if not wants_pull(generation.kv_transfer_params):
            return generation
        assert generation.kv_transfer_params is not None
        prompt = generation.prompt_ids
        layout = scheduler.kv_layout
        try:
            pulled = await self.puller.pull(
                generation.kv_transfer_params, max_bytes=layout.max_wire_bytes(len(prompt))
            )
            layout.check(pulled, prompt_ids=prompt, vocab_size=scheduler.vocab_size)
        except (KVPullError, ValueError) as err:
            log.warning("kubemoe-runtime: KV pull failed, prefilling here: %s", err)
            self.state.metrics.kv_pull_failures.inc()
            return generation
        return dataclasses.replace(generation, pulled=pulled)

    def _verified_kv_params(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """kv_transfer_params the router signed, without the signature; 400 for any others."""
        if not params:
            return None
        if self.signer is None:
            raise ApiError(
                400,
                "kv_transfer_params: this server takes kv_transfer_params only signed by the router, and "
                f"has no key to verify them ({KV_KEY_ENV} is not set)",
                param="kv_transfer_params",
            )
        try:
            return self.signer.verify(params)
        except KVAuthError as err:
            raise ApiError(400, f"kv_transfer_params: {err}", param="kv_transfer_params") from err

    def _model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.state.served_names[0]
        if requested not in self.state.served_names:
            shown = requested if len(requested) <= 256 else f"{requested[:256]}..."
            raise ApiError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")
        return requested

    def _generation_request(
        self, body: SamplingRequest, prompt_ids: list[int], *, max_tokens: int | None, default_cap: bool
    ) -> GenerationRequest:
        room = self.state.max_model_len - len(prompt_ids)
        kv_transfer_params = self._verified_kv_params(body.kv_transfer_params)
        decode_wants = (kv_transfer_params or {}).get(DECODE_MAX_TOKENS)
        if type(decode_wants) is int and decode_wants > room:  # a P/D prefill: the decode would refuse
            raise ApiError(
                400,
                f"This model's maximum context length is {self.state.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + decode_wants} tokens ({len(prompt_ids)} in the prompt, "
                f"{decode_wants} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(room, DEFAULT_COMPLETION_TOKENS) if default_cap else room
        elif max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.state.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = self.state.default_temperature if body.temperature is None else body.temperature
        top_p = self.state.default_top_p if body.top_p is None else body.top_p
        try:
            sampling = SamplingParams(
                temperature=temperature, top_p=top_p, seed=body.seed, top_k=body.top_k or 0
            )
        except ValueError as err:  # openai_requests.py checks each field; this is the engine's own word
            raise ApiError(400, str(err)) from err
        return GenerationRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=body.stop_strings(),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            kv_transfer_params=kv_transfer_params,
        )

    def _check_admissible(self, scheduler: Scheduler) -> None:
        """503 now if `_submit` would refuse a request (the waiting queue full, the engine failed, the
        drain deadline passed). Asked before a P/D decode pulls the KV: the prefill hands it out once, so a
        decode that pulled and then refused would leave the router's retry on another decode without it
        (a 404, and the prompt prefilled again). `_submit` asks again: the pull takes time."""
        try:
            scheduler.check_room()
        except QueueFull as err:
            raise _busy(err) from err
        self.state.in_flight.check_open(failure=self.state.failure)

    def _submit(self, scheduler: Scheduler, generation: GenerationRequest) -> Stream:
        outputs = OutputQueue(asyncio.get_running_loop())
        try:
            request_id = scheduler.submit(generation, outputs.put)
        except QueueFull as err:
            raise _busy(err) from err
        except ValueError as err:
            raise ApiError(400, str(err), code="context_length_exceeded") from err
        stream = Stream(scheduler, request_id, outputs)
        # ready_scheduler() passed before the body was read, the prompt tokenized, the KV pulled: since
        # then the engine may have failed and aborted all it held (engine_thread.py sets `failure` first),
        # or the drain ended. 503 now, rather than wait forever.
        self.state.in_flight.admit(stream, failure=self.state.failure)
        return stream


def _busy(err: QueueFull) -> ApiError:
    """The 503 for a full waiting queue: the router tries another backend without ejecting this one."""
    return ApiError(503, f"the server is busy: {err}", type="server_error", code="queue_full", retry_after=1)


def _reachable(params: dict[str, Any] | None, request: Request) -> dict[str, Any] | None:
    """A prefill's kv_transfer_params, with the host and port the caller reached this server at."""
    if params is None or params.get("remote_host") is not None:
        return params
    return {**params, "remote_host": request.url.hostname, "remote_port": request.url.port}
