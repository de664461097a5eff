"""Continuous batching on rank 0: requests join and leave the running batch at every step.

    submit()   any thread: validate, queue (bounded: QueueFull past `max_waiting`), wake the loop
    abort()    any thread: the request leaves at the end of the step under way (its token is not output,
               no KV is parked for it), or before the next one (its sink gets finish_reason "abort"); a
               step's forward itself is never interrupted (every rank runs it)
    step()     the engine thread, once per forward:
                 1. admit   waiting requests, oldest first, while a KV-cache slot is free on some rank and
                            the step's prompt tokens stay within `max_prefill_tokens` (at least one)
                 2. plan    a new request's row is its whole prompt; a running one's is its last token
                 3. run     GroupLeader.run: the step's forwards on every rank (prompts apart from
                            decode rows: group.py's plan_forwards), sampled tokens back
                 4. finish  per row: stop token ids (EOS unless ignore_eos), stop strings, max_tokens;
                            stream the text delta to the request's sink; free finished slots
    run()      the engine thread's loop: step while there is work, else wait (and keep followers alive;
               while an expert placement loads, poll the ranks every POLL_S: placement_switch.py); each
               turn drops parked P/D KV past its ttl (KVStore.expire)

Sinks are called on the engine thread; the server hands outputs to its event loop thread-safely.

One request's failure ends that request alone: a row the ranks could not sample (its logits not finite:
group.py's ROW_FAILURES codes come back instead of a token) and an exception in the request's own share
of the step's work (its token appended, its text streamed, its sink called, its prefilled KV kept) finish
it with an `Output` whose `engine_failed` is set and whose `error` says what failed; its slot is freed and
every other request goes on. Only what fails the whole step (a forward, a collective) leaves `step()`,
and pod.py then fails the pod.

P/D (serve/kv/handoff.py): a request whose kv_transfer_params ask for `do_remote_decode` has its prompt's KV
copied out after its first step and kept in `kv_store`; its outputs then carry the kv_transfer_params a
decode needs. A request submitted with `pulled` (the KV a decode fetched) skips its prompt: admission
emits the prefill's first token, and its first row is that token at position n with the KV imported
into its slot — no prompt token is computed (the prompt-token counter does not move); the request then
drops its `pulled`, so the host copy is freed once that step has run rather than held until the request
ends. `submit` refuses pulled KV that does not fit the model (`kv_layout`: layers, fields, shapes, dtype; a
first token outside the vocabulary), so a bad hand-off fails its own request, never the engine thread.
The decode's server asks `check_room` before it pulls the KV (the prefill hands it out once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve.group import ROW_FAILURES, GroupLeader, Row, Step
from kubemoe_runtime.engines.torch.serve.kv.handoff import (
    KVStore,
    PrefilledKV,
    prompt_digest,
    remote_prefill_params,
)
from kubemoe_runtime.engines.torch.serve.kv.layout import KVLayout
from kubemoe_runtime.engines.torch.serve.placement_switch import POLL_S
from kubemoe_runtime.engines.torch.serve.text_stream import TextStream
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import ServingMetrics

log = logging.getLogger("kubemoe_runtime.serve")

FinishReason = Literal["stop", "length", "abort"]


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    kv_transfer_params: dict[str, Any] | None = None  # P/D: as the client (router) sent them
    pulled: PrefilledKV | None = None  # P/D decode: the prompt's KV and first token, fetched from prefill

    @property
    def remote_decode(self) -> bool:
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_decode"))


@dataclass(frozen=True)
class Output:
    """One update of one request: the text and token released by this step."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    kv_transfer_params: dict[str, Any] | None = None  # P/D prefill: what the decode needs to pull the KV
    engine_failed: bool = False
    """Finished ("abort") because the engine failed, not because anyone asked: the API answers an error."""
    error: str | None = None
    """With `engine_failed`: what failed when it failed for this request alone (its logits not finite, its
    sink raised); None when the whole engine failed (pod.py)."""


Sink = Callable[[Output], None]


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    sink: Sink
    text: TextStream
    arrival: float
    rank: int = -1
    slot: int = -1
    position: int = 0  # where the next row starts
    output: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    kv_transfer_params: dict[str, Any] | None = None
    finished: bool = False  # _finish ran (its slot is free, its last output sent or attempted)


@dataclass(frozen=True)
class SchedulerLimits:
    max_model_len: int
    max_num_seqs: int  # KV-cache slots per rank
    max_waiting: int = 256
    max_prefill_tokens: int = 2048


class Scheduler:
    def __init__(
        self,
        leader: GroupLeader,
        *,
        tokenizer: TextTokenizer,
        limits: SchedulerLimits,
        eos_token_ids: Sequence[int],
        metrics: ServingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        kv_store: KVStore | None = None,
    ) -> None:
        self.leader = leader
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = metrics
        self.clock = clock
        self.kv_layout: KVLayout = leader.runner.kv_layout()
        # Prefilled KV waiting for its decode (P/D): at most one rank's cache worth of it.
        parked = self.kv_layout.bytes_per_token * limits.max_model_len * limits.max_num_seqs
        self.kv_store = kv_store if kv_store is not None else KVStore(max_bytes=parked)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._next_id = 0
        self._waiting: deque[_Sequence] = deque()
        self._aborts: set[int] = set()
        # Engine-thread state.
        self._running: dict[int, _Sequence] = {}
        self._free_slots = [list(range(limits.max_num_seqs)) for _ in range(leader.size)]
        self._released: list[list[int]] = [[] for _ in range(leader.size)]
        self._rotation = 0  # where the next tie-break among equally free ranks starts
        self.vocab_size: int = leader.runner.engine.cfg.vocab_size
        if metrics is not None:  # the load series appear once the pod can serve (pod/metrics.GaugeHook)
            for gauge in (metrics.waiting, metrics.running, metrics.kv_cache_usage):
                gauge.set(0)

    # --- any thread ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.pulled is not None:  # ValueError: another prompt's KV, or one that does not fit
            self.kv_layout.check(request.pulled, prompt_ids=request.prompt_ids, vocab_size=self.vocab_size)
        if n + request.max_tokens > self.limits.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the context "
                f"length {self.limits.max_model_len}"
            )
        with self._lock:
            self._refuse_if_full()
            request_id = self._next_id
            self._next_id += 1
            text = TextStream(self.tokenizer, stop=request.stop)
            self._waiting.append(_Sequence(request_id, request, sink, text, arrival=self.clock()))
            if self.metrics is not None:
                self.metrics.waiting.set(len(self._waiting))
        self._wakeup.set()
        return request_id

    def check_room(self) -> None:
        """QueueFull now if `submit` would raise it (the waiting queue at its bound). A P/D decode asks
        before it pulls the prompt's KV, which the prefill hands out once: refused after the pull, the
        request's retry on another decode would find no KV and prefill again."""
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        """QueueFull (counted as rejected) if the waiting queue is at its bound; under `_lock`."""
        if len(self._waiting) >= self.limits.max_waiting:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise QueueFull(f"{len(self._waiting)} requests are already waiting")

    def wake(self) -> None:
        """Have the engine thread look again now (an expert placement was posted)."""
        self._wakeup.set()

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wakeup.set()

    # --- the engine thread --------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting or self._aborts)

    def run(self, stop: threading.Event, *, keepalive_s: float = 2.0) -> None:
        """Step while there is work; when idle wait, pinging the followers every `keepalive_s`. Each turn
        drops the parked KV (P/D) whose ttl has passed: with no put or take to do it (no P/D request
        comes), it would otherwise stay in memory, up to a rank's cache worth, for good."""
        while not stop.is_set():
            self.kv_store.expire()
            if self.has_work():
                self.step()
            elif self.leader.switch.busy():  # a placement is loading: drive it on while idle
                self.leader.keepalive()
                self._wakeup.wait(timeout=POLL_S)
            elif not self._wakeup.wait(timeout=keepalive_s):
                self.leader.keepalive()
            self._wakeup.clear()
        self.abort_all()
        self.leader.shutdown()

    def abort_all(self, *, engine_failed: bool = False) -> None:
        """Finish every request ("abort"); `engine_failed`: because the engine failed (pod.py)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*waiting, *self._running.values()]:
            self._guarded(
                seq,
                functools.partial(self._finish, seq, text="", reason="abort", engine_failed=engine_failed),
            )

    def step(self) -> None:
        admitted = self._admit()
        rows: list[list[Row]] = [[] for _ in range(self.leader.size)]
        order: list[list[_Sequence]] = [[] for _ in range(self.leader.size)]
        for seq in self._running.values():
            new = seq.id in admitted
            pulled = seq.request.pulled if new else None
            if pulled is not None:  # its row takes the KV into the cache: the host copy goes with the step
                seq.request = dataclasses.replace(seq.request, pulled=None)
            tokens = list(seq.request.prompt_ids) if new and pulled is None else [seq.output[-1]]
            rows[seq.rank].append(
                Row(
                    request_id=seq.id,
                    slot=seq.slot,
                    tokens=tokens,
                    start=seq.position,
                    sampling=seq.request.sampling if new else None,
                    kv_transfer_params=seq.request.kv_transfer_params if new else None,
                    export_kv=new and pulled is None and seq.request.remote_decode,
                    kv_import=None if pulled is None else pulled.kv,
                )
            )
            order[seq.rank].append(seq)
        self._update_gauges()
        if not any(rows):
            return
        released, self._released = self._released, [[] for _ in range(self.leader.size)]
        sampled = self.leader.run(Step(rows=rows, released=released))
        exports = self.leader.take_exports()
        with self._lock:  # aborted while the step ran: the next _admit finds them no longer running
            aborted = set(self._aborts)
        now = self.clock()
        for rank, seqs in enumerate(order):
            for seq, row, token in zip(seqs, rows[rank], sampled[rank], strict=True):
                seq.position += len(row.tokens)
                if seq.id in aborted:  # its client left: no token output, no prefill's KV parked (P/D)
                    self._guarded(seq, functools.partial(self._finish, seq, text="", reason="abort"))
                    continue
                if token < 0:  # the rank could not sample this row: this request ends, the others go on
                    self._fail(seq, ROW_FAILURES.get(token, f"no next token (failure code {token})"))
                    continue
                self._guarded(
                    seq, functools.partial(self._sampled, seq, token, kv=exports.get(seq.id), now=now)
                )
        self._update_gauges()

    def _sampled(self, seq: _Sequence, token: int, *, kv: list[dict[str, Any]] | None, now: float) -> None:
        if kv is not None:
            self._keep_for_decode(seq, kv, first_token=token)
        self._append(seq, token, now=now)

    def _guarded(self, seq: _Sequence, work: Callable[[], None]) -> None:
        """`work()`, one request's (`seq`'s) share of the engine thread's work: an exception in it ends
        that request alone (`_fail`), never the step."""
        try:
            work()
        except Exception as err:
            log.exception("kubemoe-runtime: request %d: its share of the step failed", seq.id)
            self._fail(seq, f"serving this request failed: {type(err).__name__}: {err}")

    def _fail(self, seq: _Sequence, problem: str) -> None:
        """End `seq` alone, its client told `problem` (Output.engine_failed and .error); its slot is freed
        even if its sink raises again."""
        log.error("kubemoe-runtime: request %d failed: %s", seq.id, problem)
        if seq.finished:  # its last output was sent or attempted, and its slot freed, already
            return
        try:
            self._finish(seq, text="", reason="abort", engine_failed=True, error=problem)
        except Exception:
            log.exception("kubemoe-runtime: request %d: its client could not be told", seq.id)

    def _keep_for_decode(self, seq: _Sequence, kv: list[dict[str, Any]], *, first_token: int) -> None:
        prompt = seq.request.prompt_ids
        handle = self.kv_store.put(
            PrefilledKV(
                kv=kv, first_token=first_token, prompt_tokens=len(prompt), prompt_sha256=prompt_digest(prompt)
            )
        )
        # The server fills in the host and port the router reached it at.
        seq.kv_transfer_params = remote_prefill_params(handle=handle, host=None, port=None)

    def _admit(self) -> set[int]:
        admitted: set[int] = set()
        pulled: list[_Sequence] = []
        budget = self.limits.max_prefill_tokens
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            kept = deque(s for s in self._waiting if s.id not in aborts)
            aborted_waiting = [s for s in self._waiting if s.id in aborts]
            self._waiting = kept
            while self._waiting:
                rank = self._pick_rank()
                head = self._waiting[0].request
                n = len(head.prompt_ids)
                if not self._free_slots[rank] or (admitted and head.pulled is None and n > budget):
                    break
                seq = self._waiting.popleft()
                seq.rank, seq.slot = rank, self._free_slots[rank].pop(0)
                self._running[seq.id] = seq
                admitted.add(seq.id)
                if seq.request.pulled is not None:  # no prompt to run: it starts at its first token
                    seq.position = n
                    pulled.append(seq)
                    continue
                budget -= n
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(n)
        now = self.clock()
        for seq in pulled:
            assert seq.request.pulled is not None
            if self.metrics is not None:
                self.metrics.kv_pulled_tokens.inc(seq.position)
            first = seq.request.pulled.first_token
            self._guarded(seq, functools.partial(self._append, seq, first, now=now))
        for seq in aborted_waiting:
            self._guarded(seq, functools.partial(self._finish, seq, text="", reason="abort"))
        for request_id in aborts:
            if (running := self._running.get(request_id)) is not None:
                self._guarded(running, functools.partial(self._finish, running, text="", reason="abort"))
        return admitted

    def _pick_rank(self) -> int:
        """The rank with the most free slots; ties go round-robin, so idle ranks all get work."""
        size = self.leader.size
        most = max(len(free) for free in self._free_slots)
        rank = next(
            r % size
            for r in range(self._rotation, self._rotation + size)
            if len(self._free_slots[r % size]) == most
        )
        self._rotation = rank + 1
        return rank

    def _append(self, seq: _Sequence, token: int, *, now: float) -> None:
        seq.output.append(token)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        request = seq.request
        reason: FinishReason | None = None
        if token in request.stop_token_ids or (not request.ignore_eos and token in self.eos_token_ids):
            text, reason = seq.text.flush(), "stop"  # a stop token's own text is not output
        else:
            text = seq.text.add(token)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.output) >= request.max_tokens:
                text, reason = text + seq.text.flush(), "length"
        if reason is not None:
            self._finish(seq, text=text, reason=reason, token=token)
        else:
            seq.sink(self._output(seq, text=text, token=token, reason=None))

    def _finish(
        self,
        seq: _Sequence,
        *,
        text: str,
        reason: FinishReason,
        token: int | None = None,
        engine_failed: bool = False,
        error: str | None = None,
    ) -> None:
        seq.finished = True
        if self._running.pop(seq.id, None) is not None:
            self._free_slots[seq.rank].append(seq.slot)
            self._free_slots[seq.rank].sort()
            self._released[seq.rank].append(seq.id)
        if self.metrics is not None:
            self.metrics.finished("error" if engine_failed else reason)
            self.metrics.latency.observe(self.clock() - seq.arrival)
        output = self._output(seq, text=text, token=token, reason=reason)
        seq.sink(dataclasses.replace(output, engine_failed=True, error=error) if engine_failed else output)

    def _output(self, seq: _Sequence, *, text: str, token: int | None, reason: FinishReason | None) -> Output:
        return Output(
            text=text,
            token_ids=[] if token is None else [token],
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.output),
            kv_transfer_params=seq.kv_transfer_params,
        )

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            waiting = len(self._waiting)
        self.metrics.waiting.set(waiting)
        self.metrics.running.set(len(self._running))
        total = self.limits.max_num_seqs * self.leader.size
        self.metrics.kv_cache_usage.set(len(self._running) / total)
