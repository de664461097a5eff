"""Changing a serving group's expert placement while it serves (issue 17).

    POST /v1/experts/placement (app.py, on rank 0) checks the document and hands it to `PlacementSwitch`
    (202); the engine thread then drives every rank through the group's step messages (group.py):

    Begin(p)     carried by the next step (or idle keepalive): each rank starts `RankPlacement`'s loader
                 thread, which reads the experts newly placed on it from the checkpoint and builds its
                 next slots (TorchEngine.stage_placement) while the rank keeps running steps
    Poll(g)      carried by each following message: after the step every rank all_gathers one int, its
                 loader's state (loading, ready, failed)
    Switch(g)    once every rank reported ready: every rank swaps its staged slots in before that step's
                 forward, so the whole group runs each step under one placement (the message's `number`
                 is the step at which it switched); rank 0 then shows generation g
    Abort(g)     once any rank reported failed, or once g is not ready on every rank LOAD_TIMEOUT_S after
                 its Begin ("load timed out"): every rank drops what it staged (cancelling a loader still
                 running), the ranks' errors are gathered to rank 0 (on a timeout, the ranks still loading
                 say what they were doing), the old placement stays everywhere and GET /v1/experts/load
                 shows the error

A switch costs a step nothing but reference swaps (the loading and the copying happen on the loader
threads); while a generation is loading the idle engine thread polls every POLL_S instead of
KEEPALIVE_S. One generation loads at a time: another POST answers 409 until it is applied or aborted,
which the deadline bounds, so a rank whose load blocks (a stalled network volume) holds placement changes
for LOAD_TIMEOUT_S, not forever.

On a rank one loader thread reads at a time. A cancelled loader stops at its next check (before each shard
and between reads of at most 16 MiB, then before each layer), but one blocked inside a read cannot be
stopped: a later generation's loader waits for it to end (it never reads beside it), and times out at the
leader if it does not.

Memory: staging a generation allocates, beside the running model, the next expert stacks of every MoE layer
whose slots change on the rank (up to a second copy of its routed experts; TorchEngine.staging_bytes). Before
it allocates anything, the loader compares that, plus STAGING_MARGIN_BYTES, with the memory the pod may still
allocate (kv_budget.available_memory: its cgroup's limit less its working set, or the machine's
MemAvailable), divided among the pod's ranks, which may all stage at once (as kv_budget divides it for the
KV caches); where it does not fit, the rank fails the generation (`StagingMemoryError`, naming both sizes)
and the group keeps its placement, rather than being killed out of memory part way. The planner reserves
a copy of a rank's experts for this (operator plan/redundant.py `torch_staging_gib`).

LOAD_TIMEOUT_S (10 minutes; KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S in the pod's environment overrides it): a
rebalance reads the few experts each layer newly places on a rank, seconds at a volume's speed; ten
minutes reads about 100 GB at 170 MB/s, more than a rank's whole share of routed experts in the models
served here, so only a load that is stuck (or a volume slower than that) is aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubemoe_runtime.engines.torch.model.allocator import release_freed_memory
from kubemoe_runtime.engines.torch.model.engine import PlacementCancelled, StagedPlacement, TorchEngine
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.serve.kv_budget import available_memory
from kubemoe_runtime.pod.messages import human_bytes

log = logging.getLogger("kubemoe_runtime.placement")

POLL_S = 0.02  # how often an idle leader asks the ranks whether a loading placement is ready
LOAD_TIMEOUT_S = 600.0  # a generation not ready on every rank this long after its Begin is aborted
TURN_CHECK_S = 0.05  # how often a loader waiting for the previous one to end checks whether it was dropped
# Memory a generation's staging leaves free beyond what it allocates: the steps that run meanwhile (their
# activations) and the allocator's slack.
STAGING_MARGIN_BYTES = 256 << 20

LOADING, READY, FAILED = 0, 1, 2
TIMED_OUT = 3  # the leader's outcome only: no rank reports it


@dataclass(frozen=True)
class Begin:
    placement: Placement


@dataclass(frozen=True)
class Poll:
    generation: int


@dataclass(frozen=True)
class Switch:
    generation: int


@dataclass(frozen=True)
class Abort:
    generation: int
    timed_out: bool = False  # the deadline passed: ranks still loading say what they were doing


Control = Begin | Poll | Switch | Abort


class PlacementConflict(Exception):
    """A placement the leader will not start now (HTTP 409)."""


class StagingMemoryError(Exception):
    """A rank has not the memory to stage a generation (module docstring): it fails it before allocating."""


class _Job:
    """One generation's loader thread and what it produced; only that thread writes `staged` and `error`."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.staged: StagedPlacement | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.waiting_for: _Job | None = None  # the loader still reading, whose end this one waits for

    def doing(self) -> str:
        """What a loader not done yet is doing, for a timed-out generation's error."""
        waiting_for, elapsed = self.waiting_for, time.monotonic() - self.started
        if waiting_for is not None:
            return (
                f"still waiting after {elapsed:.0f} s for generation {waiting_for.placement.generation}'s "
                "loader to stop reading the checkpoint"
            )
        return f"still reading the checkpoint after {elapsed:.0f} s"


class RankPlacement:
    """One rank's side: the loader thread of the generation being loaded, and the swap."""

    def __init__(
        self, engine: TorchEngine, *, local_ranks: int = 1, available: Callable[[], int | None] | None = None
    ) -> None:
        self.engine = engine
        # bytes the pod may still allocate (None: unknown, not checked); default: kv_budget's reading
        self._available = available or available_memory
        self._local_ranks = local_ranks  # ranks in this pod: each may stage at once, so each gets 1/N
        self._job: _Job | None = None
        self.aborted_error = ""  # this rank's error in the generation last aborted ("" if it had none)
        self._turn = threading.Lock()  # held by the one loader that reads (module docstring)
        self._reader: _Job | None = None  # the loader holding it

    def before_step(self, control: Control | None) -> None:
        """Act on the control a message carries, before the step's forward (every rank, the same message)."""
        if isinstance(control, Begin):
            self._drop()
            job = _Job(control.placement)
            self._job = job
            name = f"placement-{control.placement.generation}"
            threading.Thread(target=self._load, args=(job,), name=name, daemon=True).start()
        elif isinstance(control, Switch):
            current = self._job
            staged = None if current is None else current.staged
            if staged is None or staged.placement.generation != control.generation:
                # The leader switches only once every rank said ready, so this means the group is out of
                # step; a rank left on another placement would compute wrong tokens. Fail loudly instead.
                raise RuntimeError(
                    f"told to switch to generation {control.generation}, which is not staged here"
                )
            self.engine.apply_placement(staged)
            self._job = None
        elif isinstance(control, Abort):
            self.aborted_error = self.error(timed_out=control.timed_out)  # the leader gathers it
            self._drop()

    def status(self, generation: int) -> int:
        job = self._job
        if job is None or job.placement.generation != generation:
            return FAILED
        if not job.done.is_set():
            return LOADING
        return READY if job.staged is not None else FAILED

    def error(self, *, timed_out: bool = False) -> str:
        """This rank's error in the current generation; after a timeout, what a loader not done was doing."""
        job = self._job
        if job is None:
            return ""
        if job.error is not None:
            return job.error
        return job.doing() if timed_out and not job.done.is_set() else ""

    def _drop(self) -> None:
        """Forget the current job; a loader still running stops at its next check (between reads)."""
        if self._job is not None:
            self._job.cancel.set()
        self._job = None

    def _load(self, job: _Job) -> None:
        try:
            self._wait_turn(job)
            try:
                self._check_memory(job.placement)
                job.staged = self.engine.stage_placement(job.placement, cancelled=job.cancel.is_set)
            finally:
                self._reader = None
                self._turn.release()
        except PlacementCancelled:
            pass
        except Exception as err:  # reported to the leader, which aborts the generation on every rank
            job.error = f"{type(err).__name__}: {err}"
            dropped = " (it was dropped already)" if job.cancel.is_set() else ""
            log.warning(
                "placement generation %d failed to load%s: %s", job.placement.generation, dropped, job.error
            )
        finally:
            job.done.set()

    def _check_memory(self, placement: Placement) -> None:
        """StagingMemoryError where staging `placement` would allocate more than the pod has left (less the
        margin); checked once the previous loader has ended, before anything is allocated."""
        need = self.engine.staging_bytes(placement)
        if not need:
            return
        release_freed_memory()  # what malloc keeps of this process's freed memory would read as used
        pod_room = self._available()
        if pod_room is None:
            return
        room, share = pod_room // self._local_ranks, ""
        if self._local_ranks > 1:
            share = f" (this rank's share: 1/{self._local_ranks} of the pod's {human_bytes(pod_room)})"
        if need + STAGING_MARGIN_BYTES > room:
            raise StagingMemoryError(
                f"staging generation {placement.generation} needs {human_bytes(need)} ({need} bytes) on "
                f"this rank (the next expert stacks of each MoE layer whose slots change here, beside the "
                f"current ones until the switch) and {human_bytes(STAGING_MARGIN_BYTES)} to spare, but "
                f"only {human_bytes(room)} ({room} bytes) of memory is available{share}; change fewer "
                "layers' experts at a time, or give the pods more memory"
            )

    def _wait_turn(self, job: _Job) -> None:
        """Wait until no other loader reads on this rank (PlacementCancelled if `job` is dropped first)."""
        while not self._turn.acquire(timeout=TURN_CHECK_S):
            if job.cancel.is_set():
                raise PlacementCancelled
            job.waiting_for = self._reader
        job.waiting_for = None
        self._reader = job


@dataclass(frozen=True)
class PlacementView:
    """What GET /v1/experts/load shows: the applied placement, the one loading, the last failure."""

    applied: Placement
    pending_generation: int | None
    error: str | None


class PlacementSwitch:
    """The leader's side (rank 0): one pending generation at a time, driven by the engine thread.

    `request` (the HTTP thread) and `view` (any thread) take the lock; the engine thread asks
    `next_control` for what to attach to each message and reports back with `polled`, `switched` and
    `aborted`.
    """

    def __init__(
        self,
        applied: Placement,
        *,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._applied = applied
        self._pending: Placement | None = None
        self._begun = False
        self._begun_at = 0.0  # `clock()` when the pending generation's Begin was sent
        self._outcome: int | None = None  # READY or FAILED once the ranks have said so; or TIMED_OUT
        self._error: str | None = None
        self.load_timeout_s = load_timeout_s
        self._clock = clock

    # --- any thread ---------------------------------------------------------------------------------

    def request(self, placement: Placement) -> str:
        """Start loading `placement`: "loading" (202), or "applied" (200) for the generation applied now;
        PlacementConflict (409) while another generation loads (at most `load_timeout_s` after it began),
        or for a generation number reused with other slots."""
        with self._lock:
            pending = self._pending
            if pending is not None:
                if pending.generation == placement.generation and pending.slots == placement.slots:
                    return "loading"  # the same request again
                since = f" for {self._clock() - self._begun_at:.0f} s" if self._begun else ""
                raise PlacementConflict(
                    f"generation {pending.generation} is still loading{since} (it is aborted if not ready "
                    f"{self.load_timeout_s:g} s after it began); post again once GET /v1/experts/load "
                    "shows it applied (or its error)"
                )
            if placement.generation == self._applied.generation:
                if placement.slots == self._applied.slots:
                    return "applied"
                raise PlacementConflict(
                    f"generation {placement.generation} is applied with other slots; a new placement needs a "
                    "new generation number"
                )
            self._pending, self._begun, self._outcome = placement, False, None
            return "loading"

    def view(self) -> PlacementView:
        with self._lock:
            pending = None if self._pending is None else self._pending.generation
            return PlacementView(applied=self._applied, pending_generation=pending, error=self._error)

    def busy(self) -> bool:
        """A generation is loading: the idle engine thread should poll the ranks soon."""
        with self._lock:
            return self._pending is not None

    # --- the engine thread --------------------------------------------------------------------------

    def next_control(self) -> Control | None:
        with self._lock:
            pending = self._pending
            if pending is None:
                return None
            if not self._begun:
                self._begun, self._begun_at = True, self._clock()
                return Begin(pending)
            if self._outcome is None and self._clock() - self._begun_at > self.load_timeout_s:
                self._outcome = TIMED_OUT
            if self._outcome in (FAILED, TIMED_OUT):
                return Abort(pending.generation, timed_out=self._outcome == TIMED_OUT)
            if self._outcome == READY:
                return Switch(pending.generation)
            return Poll(pending.generation)

    def polled(self, statuses: list[int]) -> None:
        """Every rank's loader state for the pending generation, after a Poll."""
        with self._lock:
            if FAILED in statuses:
                self._outcome = FAILED
            elif all(s == READY for s in statuses):
                self._outcome = READY

    def switched(self, *, step: int) -> None:
        """Every rank swapped the pending generation in before step number `step`."""
        with self._lock:
            assert self._pending is not None
            self._applied, self._pending, self._error = self._pending, None, None
            log.warning(
                "kubemoe-runtime: expert placement generation %d applied at step %d",
                self._applied.generation,
                step,
            )

    def aborted(self, errors: list[str]) -> None:
        with self._lock:
            assert self._pending is not None
            failed = "; ".join(f"rank {rank}: {error}" for rank, error in enumerate(errors) if error)
            if self._outcome == TIMED_OUT:
                why = f"load timed out after {self.load_timeout_s:g} s ({failed or 'no rank said why'})"
            else:
                why = failed or "a rank failed to load it"
            self._error = (
                f"generation {self._pending.generation} was not applied (generation "
                f"{self._applied.generation} stays): {why}"
            )
            self._pending = None
            log.error("kubemoe-runtime: %s", self._error)
