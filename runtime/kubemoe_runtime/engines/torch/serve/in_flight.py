"""The requests a torch-engine server has submitted to its scheduler and not yet answered.

Each submitted request is a `Stream`: its outputs, which the engine thread delivers into the server's
event loop (`OutputQueue`), read as one whole answer (`collect`) or as stream events (`events`); a request
whose client goes away first is aborted in the scheduler. An output with `engine_failed` set ends it with
an error: 503 `engine_failed` for a whole answer (the router tries another group), and a stream cut
without [DONE] (`EngineFailed`; the router ends it with an error event, and takes the pod out of
rotation). One whose `error` is set failed alone (its logits or its own work; scheduler.py) while the
engine serves on: that is a 500 `request_failed` with that error, for a whole answer, and for a stream
the same error as an event `data: {"error": {...}}` and then `data: [DONE]`, the stream ended cleanly;
the router passes either on as it is, and neither retries it nor counts it against the pod.

P/D: a prefill parks the prompt's KV under a handle that only its answer names (serve/kv/handoff.py), so
KV parked for a request whose answer no one reads would be held for the store's whole ttl (a minute, and
against its bytes bound): the router, which releases what it knows of (kv/release.py), never learned the
handle. So once a stream's reader stops (the client left, the router's connection to this pod was cut or
timed out, the request was ended as failed), every output still queued or still to come is handed to
`drop_parked` instead (OutputQueue.abandon), which takes its KV out of the store; a streamed answer, which
never carries the kv_transfer_params, drops its own at the end. The scheduler parks none for a request
aborted while its step ran (scheduler.py), so this is for a caller gone after the step: the KV was parked,
and its handle is on its way to the event loop, or waits in the queue.

`InFlight` holds the streams not yet answered. Where the server must stop before they finish — its drain
deadline passed (pod/drain.py) — `end_all` ends each one so, at once, instead of leaving uvicorn to cancel
its handler (a bare 500, a stream cut with no error), and refuses any request submitted after it; and
`admit` refuses a request submitted after the engine failed (engine_thread.py sets ServerState.failure
before it aborts every request the scheduler holds, so a request submitted after that abort is caught
here). All of it runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Final

from pydantic import BaseModel

from kubemoe_runtime.engines.torch.serve.scheduler import Output, Scheduler
from kubemoe_runtime.pod.api_error import ApiError, ErrorBody
from kubemoe_runtime.pod.openai_responses import FinishReason, Usage

log = logging.getLogger("kubemoe_runtime.kv")
ENGINE_FAILED: Final = "the engine failed while serving this request (the pod restarts); try again"
ENDED_AT_DRAIN_DEADLINE: Final = (
    "the server shut down at the end of its drain timeout before this request finished; try again"
)


class EngineFailed(RuntimeError):
    """A stream's engine failed: the stream is cut rather than ended as if it had finished."""


class OutputQueue:
    """The engine thread's outputs for one request, delivered into the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self._unread: Callable[[Output], None] | None = None  # set once no one reads the queue

    def put(self, output: Output) -> None:  # called on the engine thread
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver, output)

    def _deliver(self, output: Output) -> None:
        if self._unread is None:
            self.queue.put_nowait(output)
        else:
            self._unread(output)

    def abandon(self, unread: Callable[[Output], None]) -> None:
        """No one reads this queue any more: `unread` gets each output it holds, and each one delivered
        from now on (on the event loop's thread)."""
        self._unread = unread
        while not self.queue.empty():
            unread(self.queue.get_nowait())

    async def __aiter__(self) -> AsyncIterator[Output]:
        while True:
            output = await self.queue.get()
            yield output
            if output.finish_reason is not None:
                return


class Stream:
    """One submitted request's outputs, aborted in the scheduler if the client goes away first."""

    def __init__(self, scheduler: Scheduler, request_id: int, outputs: OutputQueue) -> None:
        self.scheduler = scheduler
        self.request_id = request_id
        self.outputs = outputs
        self.failure = ENGINE_FAILED  # what a failed request's client is told
        self.on_end: Callable[[Stream], None] = lambda _: None

    def fail(self, message: str) -> None:
        """End this request now as failed (on the event loop's thread), and abort it in the scheduler."""
        self.failure = message
        self.outputs.queue.put_nowait(
            Output(
                text="",
                token_ids=[],
                finish_reason="abort",
                prompt_tokens=0,
                completion_tokens=0,
                engine_failed=True,
            )
        )
        self.scheduler.abort(self.request_id)

    def drop_parked(self, output: Output) -> None:
        """Drop the KV a prefill parked for this request (P/D), if `output` names it: no decode can fetch it,
        as the answer naming it does not reach the caller."""
        handle = (output.kv_transfer_params or {}).get("remote_handle")
        if isinstance(handle, str) and self.scheduler.kv_store.take(handle) is not None:
            # a handle lets anyone fetch its KV: not whole into the log
            log.info("kubemoe-runtime: dropped KV %s...: its answer reached no one", handle[:6])

    def _stopped_reading(self, *, finished: bool) -> None:
        """The reader is done (`finished`: it read the last output): abort the request unless it finished,
        and drop any KV parked for it that comes after. Then it leaves the in-flight set."""
        if not finished:
            self.scheduler.abort(self.request_id)
        self.outputs.abandon(self.drop_parked)
        self.on_end(self)

    async def collect(self) -> tuple[str, Output]:
        parts: list[str] = []
        last: Output | None = None
        try:
            async for output in self.outputs:
                parts.append(output.text)
                last = output
        finally:
            self._stopped_reading(finished=last is not None and last.finish_reason is not None)
        assert last is not None
        if last.engine_failed:  # no answer names the KV a prefill may have parked before the failure
            self.drop_parked(last)
        if last.engine_failed and last.error is not None:  # this request alone failed: the pod serves on
            raise request_failed(last.error)
        if last.engine_failed:  # 503: the router tries another group
            raise ApiError(503, self.failure, type="server_error", code="engine_failed")
        return "".join(parts), last

    async def events(
        self,
        chunk: Callable[[str, FinishReason | None], BaseModel],
        *,
        first: BaseModel | None,
        usage_chunk: Callable[[Usage], BaseModel] | None,
    ) -> AsyncIterator[BaseModel]:
        """The stream's events (`sse` adds [DONE] once they end); EngineFailed if the engine failed."""
        finished = False
        try:
            if first is not None:
                yield first
            async for output in self.outputs:
                if output.engine_failed:
                    self.drop_parked(output)
                    if output.error is None:  # cut, without [DONE]: the router ends it with an error event
                        raise EngineFailed(self.failure)
                    yield ErrorBody(error=request_failed(output.error).detail)  # this request alone failed
                    return
                finished = output.finish_reason is not None
                if finished:  # a stream carries no kv_transfer_params: no decode could fetch this KV
                    self.drop_parked(output)
                if output.text or finished:
                    yield chunk(output.text, output.finish_reason)
                if finished and usage_chunk is not None:
                    yield usage_chunk(usage(output))
        finally:
            self._stopped_reading(finished=finished)


class InFlight:
    """The streams submitted and not yet answered (held weakly: a stream whose response was never read,
    its client gone before it began, is dropped with it)."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self.ended: str | None = None
        """Why requests are no longer served (the drain deadline passed); None while they are."""

    def __len__(self) -> int:
        return len(self._streams)

    def check_open(self, *, failure: str | None) -> None:
        """ApiError 503 if a request submitted now would be refused: the engine has failed (`failure`, the
        server's) or requests are no longer served."""
        if failure is not None or self.ended is not None:
            message = f"the engine failed: {failure}" if failure is not None else str(self.ended)
            raise ApiError(503, message, type="server_error", code="engine_failed")

    def admit(self, stream: Stream, *, failure: str | None) -> None:
        """Hold `stream`, just submitted; unless the engine has failed (`failure`, the server's) or
        requests are no longer served: then it is aborted, and ApiError 503 says why."""
        try:
            self.check_open(failure=failure)
        except ApiError:
            stream.scheduler.abort(stream.request_id)
            raise
        stream.on_end = self._streams.discard
        self._streams.add(stream)

    def end_all(self, message: str = ENDED_AT_DRAIN_DEADLINE) -> int:
        """End every stream in flight as failed, telling its client `message`, and refuse any submitted
        from now on; returns how many were ended."""
        self.ended = message
        streams = list(self._streams)
        self._streams.clear()
        for stream in streams:
            stream.fail(message)
        return len(streams)


def request_failed(message: str) -> ApiError:
    """A request that failed alone while the engine serves on (scheduler.py: Output.error)."""
    return ApiError(500, message, type="server_error", code="request_failed")


def usage(output: Output) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )
