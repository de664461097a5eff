"""A serving group: the expert-parallel ranks of one replica, driven step by step by rank 0.

Every MoE layer runs collectives (parallel.py), so all ranks of a group must make the same forward calls
in the same order. Serving keeps them in lockstep with one scheme (data-parallel attention, expert-parallel
MoE, as vLLM's `--data-parallel-size N --enable-expert-parallel`):

    rank 0 (the API leader) owns the scheduler. It places each admitted request on one rank (the one with
    the most free KV-cache slots) and slot for the request's whole life; that rank alone keeps its KV
    cache and its seeded sampler.

    each step
      1. broadcast   rank 0 sends the `Step` — for every rank the rows it runs (request, slot, new
                     tokens, first position; a new request's sampling parameters) and the requests it
                     may forget — with broadcast_object_list (gloo, CPU)
      2. forward     every rank runs the same forwards, each over its own rows of that forward:
                     attention on its own cache; the MoE layers all_gather every rank's tokens to the
                     expert owners and all_reduce the results back (parallel.py). A rank with no rows in
                     a forward runs a one-token dummy row into a scratch slot, so the collectives still
                     line up. Which rows go into which forward is `plan_forwards(step.rows)`: a function
                     of the step alone, which every rank has, so every rank makes the same forwards
      3. sample      each rank samples its rows' next tokens from the last real position of each row; a
                     row whose logits are not finite, or whose sampling fails, gets a failure code
                     (ROW_FAILURES: negative, never a token id) instead, and the other rows go on
      4. gather      one all_gather of fixed width (every rank knows every rank's row count from the
                     step) brings the sampled ids (and failure codes) to rank 0, whose scheduler then
                     checks stops, streams text, ends the failed rows' requests alone, and plans the
                     next step

    the forwards    rows of a forward are padded to its longest (a prompt's row is the whole prompt, a
                    running request's its one new token), so one forward over a 500-token prompt and
                    16 decoding requests would run 17 x 500 token rows for 516 real ones, and the MoE
                    all-gather and the [B, 1, T, S] attention mask grow with it. `plan_forwards` sorts
                    the step's rows by length and cuts them into forwards of similar lengths (decode rows
                    apart from prompts, a short prompt apart from a long one) where the padding that
                    saves costs more than one more forward (FORWARD_COST_TOKENS token rows); a step of
                    one length (every decode step) stays one forward. Rows are independent (each its own
                    cache slot), so the tokens are the same whichever forward a row runs in

    between steps    while idle, rank 0 broadcasts a `Keepalive` every few seconds, so followers blocked
                     in step 1 never reach the process group's timeout; `Shutdown` ends the followers

Once serving, every collective has the group's serving timeout (pod.py: minutes, not the half hour weight
loading gets), so a rank that stays connected but goes silent (stuck, partitioned, its node gone without a
FIN) fails the others' next collective within it, as a rank that left does at once. Each rank's
`Heartbeat` records when its engine thread last made progress (a message handled, a step or keepalive
done, and, once `watch`ed, each decoder block's forward): the pod's /health fails when it has made none
for longer than the serving timeout and a margin, whatever the thread is stuck in.

Expert placement (placement_switch.py): a Step or Keepalive may carry a placement control; every rank
acts on it before the step's forward (Begin: start loading; Switch: swap the staged slots in; Abort: drop
them) and after it (Poll: one all_gather of each rank's loader state; Abort: one gather_object of the
errors to rank 0). Steps are numbered: a Switch takes effect at the step whose message carries it.

Ranks run in one or more pods: a pod runs `--data-parallel-size-local` ranks (the first in its own process,
the rest as child processes); every rank joins the group through the TCP store at
`--data-parallel-address:--data-parallel-rpc-port`, which rank 0 hosts.

P/D disaggregation (serve/kv/handoff.py): a prefill row with `export_kv` has its slot's cache copied out right
after its forward (rows on other ranks send theirs to rank 0 with one gather_object, in steps that have
any); a decode row with `kv_import` has the pulled cache written into its slot before its forward, so its
first row is the first generated token at position n, not the prompt. The pulled KV reaches its rank
inside the step broadcast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kubemoe_runtime.engines.torch.model.engine import TorchEngine
from kubemoe_runtime.engines.torch.model.expert_load import valid_tokens
from kubemoe_runtime.engines.torch.model.kv_cache import KVCache
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.sampling import NonFiniteLogits, SamplingParams, sample
from kubemoe_runtime.engines.torch.serve.kv.layout import KVLayout
from kubemoe_runtime.engines.torch.serve.placement_switch import (
    LOAD_TIMEOUT_S,
    Abort,
    Control,
    PlacementSwitch,
    Poll,
    RankPlacement,
    Switch,
)

log = logging.getLogger("kubemoe_runtime.serve")

FORWARD_COST_TOKENS = 128
"""What one more forward in a step costs, counted in token rows of a forward (plan_forwards): on a CPU a
forward has a fixed cost (every layer's weights read, the collectives' round trips) and a cost per token
row. The tests' tiny Qwen3-MoE measures about 150 rows (a 16-row decode forward 4.4 ms, a 500-token
prompt alone 20 ms: bench/bench_mixed_steps.py). For a large MoE the fixed cost is the weights a forward
reads and the per-row cost its active parameters' FLOPs: estimated (not measured) at about 10 rows on
AVX2 to 150 with AMX. Too low a value costs at most one forward's fixed cost where one forward would
have been as fast; too high a value runs at most about this many padding rows more than it must."""

NONFINITE_LOGITS = -1
SAMPLING_FAILED = -2
ROW_FAILURES: dict[int, str] = {
    NONFINITE_LOGITS: "the model's logits for this request were not finite (NaN or infinity: an overflow "
    "in the forward), so no next token could be chosen",
    SAMPLING_FAILED: "choosing this request's next token failed (the rank's log has the error)",
}
"""What a rank returns instead of a token for a row it could not sample (never a token id: negative),
and what the request's client is told."""


class Heartbeat:
    """When a rank's engine thread last made progress; any thread may ask (`stalled`)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._reported = False  # this stall was logged

    def beat(self) -> None:
        self._last = self._clock()
        self._reported = False

    def silent_s(self) -> float:
        return self._clock() - self._last

    def stalled(self, limit_s: float) -> str | None:
        """Why the engine thread counts as stuck (no progress for over `limit_s`), or None; logged once."""
        silent = self.silent_s()
        if silent <= limit_s:
            return None
        problem = (
            f"the engine thread has made no progress for {silent:.0f} s (limit {limit_s:g} s): stuck in a "
            "collective or a device call"
        )
        if not self._reported:
            self._reported = True
            log.error("kubemoe-runtime: %s", problem)
        return problem

    def watch(self, engine: TorchEngine) -> None:
        """Beat after each decoder block's forward too, so that a step longer than the limit (a long
        prefill: many layers) still beats once a layer. Once per engine (each call adds hooks)."""
        for block in engine.model.blocks():
            block.register_forward_hook(self._block_done)

    def _block_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.beat()


@dataclass(frozen=True)
class Row:
    """One request's share of a step on its rank: `tokens` at positions start .. start+len-1."""

    request_id: int
    slot: int
    tokens: list[int]
    start: int
    sampling: SamplingParams | None = None  # set on the request's first step: the rank makes its sampler
    kv_transfer_params: dict[str, Any] | None = None  # the request's P/D parameters (informational)
    export_kv: bool = False  # P/D prefill: copy this row's cache (positions 0 .. start+len-1) after the step
    kv_import: list[dict[str, torch.Tensor]] | None = None  # P/D decode: write into the slot before the step


@dataclass(frozen=True)
class Step:
    rows: list[list[Row]]  # per rank
    released: list[list[int]] = field(default_factory=list)  # per rank: request ids it may forget
    number: int = 0  # the leader's step count (set by GroupLeader.run)
    placement: Control | None = None  # set by GroupLeader.run


@dataclass(frozen=True)
class Keepalive:
    placement: Control | None = None


@dataclass(frozen=True)
class Shutdown:
    pass


Message = Step | Keepalive | Shutdown


class RankRunner:
    """One rank's engine, KV cache and per-request samplers."""

    def __init__(self, engine: TorchEngine, *, slots: int, max_len: int, local_ranks: int = 1) -> None:
        self.engine = engine
        self.slots = slots
        self.max_len = max_len
        # One spare slot for dummy rows; one spare position for padding written past a row's end.
        self.cache: KVCache = engine.model.new_cache(slots=slots + 1, max_len=max_len + 1, dtype=engine.dtype)
        self.samplers: dict[int, tuple[SamplingParams, torch.Generator | None]] = {}
        self.exports: dict[int, list[dict[str, torch.Tensor]]] = {}  # request id -> KV, for rank 0 to take
        self.placement = RankPlacement(engine, local_ranks=local_ranks)  # they share the pod's memory
        self.heartbeat = Heartbeat()

    @torch.inference_mode()
    def run(self, rows: list[list[Row]], *, rank: int, released: list[int]) -> list[int]:
        """This rank's share of a step (`rows`: every rank's, as the step has them): its rows `rows[rank]`
        in the forwards `plan_forwards(rows)` names, a dummy row in those it has none of; returns each of
        its rows' next token, or a ROW_FAILURES code."""
        mine = rows[rank]
        for request_id in released:
            self.samplers.pop(request_id, None)
        for row in mine:
            if row.sampling is not None:
                self.samplers[row.request_id] = (row.sampling, row.sampling.generator())
            if row.kv_import is not None:
                self.import_kv(row.slot, row.kv_import)
        out = [SAMPLING_FAILED] * len(mine)  # every row is in one forward: each entry is set below
        load = self.engine.expert_load
        for forward in plan_forwards(rows):
            if rank == 0:  # the leader's counts are the ones read (expert_load.py): only real tokens
                lengths = [[len(rows[r][b].tokens) for b in picked] for r, picked in enumerate(forward)]
                load.valid_M = valid_tokens(lengths, device=load.counts_LE.device)
            picked = forward[rank]
            if not picked:
                self._dummy_forward()
                continue
            for b, token in zip(picked, self._forward([mine[b] for b in picked]), strict=True):
                out[b] = token
        for row in mine:
            if row.export_kv:
                self.exports[row.request_id] = self.export_kv(row.slot, length=row.start + len(row.tokens))
        return out

    def _forward(self, rows: list[Row]) -> list[int]:
        """One forward over `rows` (padded to the longest); each row's next token or failure code."""
        B, T = len(rows), max(len(r.tokens) for r in rows)
        tokens_BT = torch.zeros((B, T), dtype=torch.int64)
        pos_BT = torch.zeros((B, T), dtype=torch.int64)
        for b, row in enumerate(rows):
            n = len(row.tokens)
            tokens_BT[b, :n] = torch.tensor(row.tokens)
            # Padding repeats position start+n: it writes the row's next position, which the row's next
            # real token overwrites before anything attends to it.
            pos_BT[b] = (row.start + torch.arange(T)).clamp(max=row.start + n)
        slots_B = torch.tensor([r.slot for r in rows])
        last_B = torch.tensor([len(r.tokens) - 1 for r in rows])
        logits_BTV = self.engine.model(
            tokens_BT, pos_BT=pos_BT, cache=self.cache, slots_B=slots_B, logits_at_B=last_B
        )
        return [self._sample(row, logits_BTV[b, -1]) for b, row in enumerate(rows)]

    def _sample(self, row: Row, logits_V: torch.Tensor) -> int:
        """The row's next token; a failure code (ROW_FAILURES) when its logits are not finite or sampling
        fails, so that one request's failure ends that request, not the step (scheduler.py)."""
        try:
            params, generator = self.samplers[row.request_id]
            return sample(logits_V, params, generator)
        except NonFiniteLogits as err:
            log.error("kubemoe-runtime: request %d at position %d: %s", row.request_id, row.start, err)
            return NONFINITE_LOGITS
        except Exception:
            log.exception("kubemoe-runtime: request %d: sampling failed", row.request_id)
            return SAMPLING_FAILED

    def take_exports(self) -> dict[int, list[dict[str, torch.Tensor]]]:
        exports, self.exports = self.exports, {}
        return exports

    def _dummy_forward(self) -> None:
        self.engine.model(
            torch.zeros((1, 1), dtype=torch.int64),
            pos_BT=torch.zeros((1, 1), dtype=torch.int64),
            cache=self.cache,
            slots_B=torch.tensor([self.slots]),
            last_only=True,
        )

    def kv_layout(self) -> KVLayout:
        """What a pulled KV must look like to be imported here (every rank of a group has the same)."""
        layers = self.cache.layers
        dtype = next(t.dtype for layer in layers for t in layer.tensors.values())
        fields = tuple({name: tuple(t.shape[2:]) for name, t in layer.tensors.items()} for layer in layers)
        return KVLayout(fields=fields, dtype=dtype)

    def export_kv(self, slot: int, *, length: int) -> list[dict[str, torch.Tensor]]:
        """A finished prefill's cache, for KV transfer to a decode group (P/D)."""
        return self.cache.export_slot(slot, length=length)

    def import_kv(self, slot: int, kv: list[dict[str, torch.Tensor]]) -> int:
        return self.cache.import_slot(slot, kv)


class GroupLeader:
    """Rank 0's handle on the group: run a step on every rank and collect the sampled tokens."""

    def __init__(
        self, runner: RankRunner, *, ep: ExpertParallel, placement_timeout_s: float = LOAD_TIMEOUT_S
    ) -> None:
        if ep.rank != 0:
            raise ValueError("only rank 0 leads a serving group")
        self.runner = runner
        self.ep = ep
        self._exports: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.switch = PlacementSwitch(runner.engine.placement, load_timeout_s=placement_timeout_s)
        self.steps = 0  # steps run so far: the next step's number
        self.heartbeat = runner.heartbeat
        self.heartbeat.beat()  # serving starts now (the load barrier may have taken long)

    @property
    def size(self) -> int:
        return self.ep.size

    def run(self, step: Step) -> list[list[int]]:
        """Sampled tokens per rank, in the order of `step.rows[rank]`."""
        sampled = self._run(step)
        self.heartbeat.beat()
        return sampled

    def _run(self, step: Step) -> list[list[int]]:
        step = Step(
            rows=step.rows, released=step.released, number=self.steps, placement=self.switch.next_control()
        )
        self.steps += 1
        released = step.released or [[] for _ in range(self.size)]
        # Expert load (model/expert_load.py): rank 0 sees every rank's routing; RankRunner.run has it count
        # only real tokens.
        self.runner.engine.expert_load.tick()
        if self.size == 1:
            self.runner.placement.before_step(step.placement)
            sampled = [self.runner.run(step.rows, rank=0, released=released[0])]
            self._exports.update(self.runner.take_exports())
            self._after(step.placement, step=step.number)
            return sampled
        _broadcast(step)
        self.runner.placement.before_step(step.placement)
        mine = self.runner.run(step.rows, rank=0, released=released[0])
        sampled = _gather_tokens(mine, rows=step.rows, size=self.size)
        self._exports.update(self.runner.take_exports())
        if _exports_elsewhere(step):
            parts: list[Any] = [None] * self.size
            dist.gather_object({}, parts, dst=0)
            for part in parts[1:]:
                self._exports.update(part)
        self._after(step.placement, step=step.number)
        return sampled

    def _after(self, control: Control | None, *, step: int) -> None:
        """The placement control's collectives after a message (every rank runs `_after_step` alike)."""
        if control is None:
            return
        result = _after_step(control, self.runner.placement, size=self.size)
        if isinstance(control, Poll):
            self.switch.polled(result)
        elif isinstance(control, Switch):
            self.switch.switched(step=step)
        elif isinstance(control, Abort):
            self.switch.aborted(result)

    def take_exports(self) -> dict[int, list[dict[str, torch.Tensor]]]:
        """The KV copied out by this step's `export_kv` rows, by request id."""
        exports, self._exports = self._exports, {}
        return exports

    def keepalive(self) -> None:
        self.runner.engine.expert_load.tick()  # idle: the load window still moves
        control = self.switch.next_control()
        if self.size > 1:
            _broadcast(Keepalive(placement=control))
        self.runner.placement.before_step(control)
        self._after(control, step=self.steps)  # idle: before the next step
        self.heartbeat.beat()

    def shutdown(self) -> None:
        if self.size > 1:
            _broadcast(Shutdown())


def follow(runner: RankRunner, *, ep: ExpertParallel) -> None:
    """A non-leader rank's life: run whatever step rank 0 broadcasts, until it says Shutdown."""
    while True:
        runner.heartbeat.beat()  # the last message handled (or following began)
        message = _receive()
        if isinstance(message, Shutdown):
            return
        runner.placement.before_step(message.placement)
        if isinstance(message, Step):
            released = message.released[ep.rank] if message.released else []
            mine = runner.run(message.rows, rank=ep.rank, released=released)
            _gather_tokens(mine, rows=message.rows, size=ep.size)
            exports = runner.take_exports()
            if _exports_elsewhere(message):
                dist.gather_object(exports, None, dst=0)
        if message.placement is not None:
            _after_step(message.placement, runner.placement, size=ep.size)


def _after_step(control: Control, placement: RankPlacement, *, size: int) -> list[Any]:
    """After a message with a placement control, on every rank: Poll all_gathers each rank's loader state
    (returned on every rank); Abort gathers each rank's error to rank 0 (returned there)."""
    if isinstance(control, Poll):
        mine = placement.status(control.generation)
        if size == 1:
            return [mine]
        states = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(states, torch.tensor([mine], dtype=torch.int64))
        return [int(s) for s in states]
    if isinstance(control, Abort):
        if size == 1:
            return [placement.aborted_error]
        errors: list[Any] = [None] * size if dist.get_rank() == 0 else []
        dist.gather_object(placement.aborted_error, errors if dist.get_rank() == 0 else None, dst=0)
        return errors
    return []


def plan_forwards(rows: Sequence[Sequence[Row]]) -> list[list[list[int]]]:
    """The forwards a step's rows run in: per forward, per rank, the indexes of that rank's rows in it
    (in their order). A function of the rows' lengths alone, so every rank, given the same step, makes the
    same forwards. A step whose rows are all one length (or that has none) is one forward.

    Each forward pads a rank's rows to that rank's longest, so its cost is taken as FORWARD_COST_TOKENS
    plus its padded token rows on the busiest rank (the MoE all-gather pads every rank to that many).
    Forwards take contiguous ranges of the step's distinct row lengths; the cheapest cut is found by
    dynamic programming over them (their number is at most the step's prompts plus one: a few).
    """
    lengths = [[len(row.tokens) for row in rank_rows] for rank_rows in rows]
    distinct = sorted({n for rank_lengths in lengths for n in rank_lengths})
    if len(distinct) <= 1:
        return [[list(range(len(rank_lengths))) for rank_lengths in lengths]]
    where = {n: k for k, n in enumerate(distinct)}
    counts = [[0] * len(distinct) for _ in lengths]  # per rank, rows of each distinct length
    for r, rank_lengths in enumerate(lengths):
        for n in rank_lengths:
            counts[r][where[n]] += 1
    # best[j]: the least cost of running the rows of the j shortest lengths; cut[j]: where its last
    # forward's lengths start.
    best = [0] + [-1] * len(distinct)
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows_r, longest_r = [0] * len(lengths), [0] * len(lengths)
        for i in range(j - 1, -1, -1):  # the last forward: lengths distinct[i:j], widened one at a time
            for r, rank_counts in enumerate(counts):
                if rank_counts[i]:
                    rows_r[r] += rank_counts[i]
                    longest_r[r] = longest_r[r] or distinct[i]  # the first one met is the longest
            padded = max(n * t for n, t in zip(rows_r, longest_r, strict=True))
            cost = best[i] + FORWARD_COST_TOKENS + padded
            if best[j] < 0 or cost <= best[j]:  # on a tie, the wider last forward (i runs downwards)
                best[j], cut[j] = cost, i
    spans = []
    j = len(distinct)
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    plan = []
    for i, j in reversed(spans):
        members = set(distinct[i:j])
        plan.append([[b for b, n in enumerate(rank_lengths) if n in members] for rank_lengths in lengths])
    return plan


def _exports_elsewhere(step: Step) -> bool:
    """Whether a rank other than 0 exports KV this step (then every rank joins one gather_object)."""
    return any(row.export_kv for rows in step.rows[1:] for row in rows)


def _gather_tokens(mine: list[int], *, rows: list[list[Row]], size: int) -> list[list[int]]:
    """Every rank's sampled tokens, in one all_gather: the step tells each rank every rank's row count."""
    width = max(1, *(len(r) for r in rows))
    local = torch.full((width,), -1, dtype=torch.int64)
    local[: len(mine)] = torch.tensor(mine, dtype=torch.int64)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return [parts[r][: len(rows[r])].tolist() for r in range(size)]


def _broadcast(message: Message) -> None:
    dist.broadcast_object_list([message], src=0)


def _receive() -> Message:
    box: list[Message | None] = [None]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    if not isinstance(message, Step | Keepalive | Shutdown):
        raise TypeError(f"rank 0 sent {type(message).__name__}, not a step")
    return message
