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
    Abort(g)     once any rank reported failed: every rank drops what it staged (cancelling a loader still
                 running), the failed ranks' errors are gathered to rank 0, the old placement stays
                 everywhere and GET /v1/experts/load shows the error

A switch costs a step nothing but reference swaps (the loading and the copying happen on the loader
threads); while a generation is loading the idle engine thread polls every POLL_S instead of
KEEPALIVE_S. One generation loads at a time: another POST answers 409 until it is applied or aborted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kubemoe_runtime.engines.torch.model.engine import PlacementCancelled, StagedPlacement, TorchEngine
from kubemoe_runtime.engines.torch.model.placement import Placement

log = logging.getLogger("kubemoe_runtime.placement")

POLL_S = 0.02  # how often an idle leader asks the ranks whether a loading placement is ready

LOADING, READY, FAILED = 0, 1, 2


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


Control = Begin | Poll | Switch | Abort


class PlacementConflict(Exception):
    """A placement the leader will not start now (HTTP 409)."""


class _Job:
    """One generation's loader thread and what it produced; only that thread writes `staged` and `error`."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.staged: StagedPlacement | None = None
        self.error: str | None = None


class RankPlacement:
    """One rank's side: the loader thread of the generation being loaded, and the swap."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self._job: _Job | None = None
        self.aborted_error = ""  # this rank's error in the generation last aborted ("" if it had none)

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
            self.aborted_error = self.error()  # the leader gathers it after the step
            self._drop()

    def status(self, generation: int) -> int:
        job = self._job
        if job is None or job.placement.generation != generation:
            return FAILED
        if not job.done.is_set():
            return LOADING
        return READY if job.staged is not None else FAILED

    def error(self) -> str:
        job = self._job
        return "" if job is None or job.error is None else job.error

    def _drop(self) -> None:
        """Forget the current job; a loader still running stops at its next layer."""
        if self._job is not None:
            self._job.cancel.set()
        self._job = None

    def _load(self, job: _Job) -> None:
        try:
            job.staged = self.engine.stage_placement(job.placement, cancelled=job.cancel.is_set)
        except PlacementCancelled:
            pass
        except Exception as err:  # reported to the leader, which aborts the generation on every rank
            job.error = f"{type(err).__name__}: {err}"
            log.warning("placement generation %d failed to load: %s", job.placement.generation, job.error)
        finally:
            job.done.set()


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

    def __init__(self, applied: Placement) -> None:
        self._lock = threading.Lock()
        self._applied = applied
        self._pending: Placement | None = None
        self._begun = False
        self._outcome: int | None = None  # READY or FAILED once the ranks have said so
        self._error: str | None = None

    # --- any thread ---------------------------------------------------------------------------------

    def request(self, placement: Placement) -> str:
        """Start loading `placement`: "loading" (202), or "applied" (200) for the generation applied now;
        PlacementConflict (409) while another generation loads, or for a generation number reused with
        other slots."""
        with self._lock:
            pending = self._pending
            if pending is not None:
                if pending.generation == placement.generation and pending.slots == placement.slots:
                    return "loading"  # the same request again
                raise PlacementConflict(
                    f"generation {pending.generation} is still loading; post again once GET /v1/experts/load "
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
                self._begun = True
                return Begin(pending)
            if self._outcome == FAILED:
                return Abort(pending.generation)
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
            self._error = (
                f"generation {self._pending.generation} was not applied (generation "
                f"{self._applied.generation} stays): {failed or 'a rank failed to load it'}"
            )
            self._pending = None
            log.error("kubemoe-runtime: %s", self._error)
