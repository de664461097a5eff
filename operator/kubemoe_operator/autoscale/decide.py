"""The autoscaling decision: a pure function of (replicas, samples, policy, history, clock).

Per metric, the recommendation is proportional, as in the Horizontal Pod Autoscaler:
``ceil(ready * value / target)``, left at ``current`` within a 10 % tolerance band. `value` is the
mean over the groups that report, so the load it measures is carried by the `ready` groups, not by
`current` (which counts groups still loading their weights): while new groups load, the old ones
stay busy, and `current * value` would add groups every interval until the new ones report
(2 -> 5 -> 8 in a probe); `ready * value` asks for the same groups again. The largest
recommendation over the metrics wins. Then, in order:

1. missing metrics never scale down: with any metric unavailable the decision is at least
   ``current``; with all unavailable it is exactly ``current``. Missing is no series to read; a
   latency histogram with no observations in the interval is no requests, which the sources give
   as 0 (no load), not as missing;
2. a full window first: a change needs readings covering its direction's window since `since`
   (when this evaluator's unbroken run of readings began: after a start, a leader failover, a
   metrics outage or a gap in its evaluations (the API server down, autoscaling off for a while) it
   knows nothing of what came before, and holds);
3. stabilisation: scaling up takes the smallest recommendation of the scale-up window
   (the load must have lasted), scaling down the largest of the scale-down window (the
   quiet must have lasted) — so one noisy sample moves nothing, and nothing flaps;
4. a cooldown: no change within ``cooldownSeconds`` of the last one (new groups get time to
   load and take load before the next decision builds on them; the last change is kept in status,
   so a restart or a new leader keeps it);
5. at most ``maxStep`` groups added or removed;
6. clamped to ``minReplicas..maxReplicas``.

For prefill with ``perDecode``, `couple` then keeps the decision within that many groups per decode
group (the loop passes decode's own decision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from kubemoe_operator.api.spec import Autoscaling, MetricType, PerDecode

TOLERANCE = 0.1


@dataclass(frozen=True)
class Recommendation:
    """What the metrics asked for at one evaluation (before stabilisation), kept as history."""

    at: float
    """Seconds (monotonic clock of the caller)."""
    replicas: int


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: Recommendation
    """Record this in the history for the next evaluation."""
    reason: str
    """Why, in plain words: for the Event and the status condition."""
    metrics_available: bool
    """False when no metric could be read (then nothing changes)."""
    signal: str | None = None
    """What decided: the metric whose recommendation won, "perDecode" when the coupling to decode
    did (`couple`), None when nothing could (no metrics, none readable)."""


MAX_RECOMMENDATION = 1 << 30
"""A recommendation past any ceiling (maxReplicas is clamped later): a huge but finite reading (1e308
over a target of 0.5 is infinite) asks for this many, not for an OverflowError."""


def _per_metric(current: int, ready: int, value: float, target: float) -> int:
    ratio = value / target
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return max(1, math.ceil(min(ready * ratio, MAX_RECOMMENDATION)))


def decide(
    *,
    current: int,
    samples: Mapping[MetricType, float | None],
    policy: Autoscaling,
    history: Sequence[Recommendation],
    now: float,
    ready: int | None = None,
    since: float | None = None,
    last_change: float | None = None,
) -> Decision:
    """The replicas a role should have now. ``samples`` maps each policy metric to its per-group
    value, or None when it could not be read; ``ready`` is the groups serving (None or 0: take
    ``current``); ``since`` when the unbroken run of readings began (None: long enough);
    ``last_change`` when this evaluator last changed the role (None: not since it started)."""
    carrying = ready if ready else current
    wanted: list[tuple[int, str, MetricType]] = []
    missing: list[str] = []
    for metric in policy.metrics:
        value = samples.get(metric.type)
        if value is None or not math.isfinite(value) or value < 0:  # no reading is one to act on
            missing.append(metric.type)
            continue
        wanted.append(
            (
                _per_metric(current, carrying, value, metric.target),
                f"{metric.type} {value:.3g} (target {metric.target:g})",
                metric.type,
            )
        )

    if not wanted:
        rec = Recommendation(now, current)
        why = (
            f"metrics unavailable ({', '.join(missing)}); holding {current}"
            if missing
            else "no metrics configured"
        )
        return Decision(_clamp(current, policy), rec, why, metrics_available=not missing)

    raw, because, signal = max(wanted, key=lambda w: w[0])
    if missing:
        raw = max(raw, current)
    rec = Recommendation(now, raw)
    window = [*history, rec]
    covered = math.inf if since is None else now - since
    wait: str | None = None
    if raw > current:
        recent = [r.replicas for r in window if r.at >= now - policy.scale_up_window_seconds]
        stable = max(current, min(recent))
        if covered < policy.scale_up_window_seconds:
            wait = f"readings for {covered:.0f} of the {policy.scale_up_window_seconds} s scale-up window"
    elif raw < current:
        recent = [r.replicas for r in window if r.at >= now - policy.scale_down_window_seconds]
        stable = min(current, max(recent))
        if covered < policy.scale_down_window_seconds:
            wait = f"readings for {covered:.0f} of the {policy.scale_down_window_seconds} s scale-down window"
    else:
        stable = current
    since_change = math.inf if last_change is None else now - last_change
    if wait is None and stable != current and since_change < policy.cooldown_seconds:
        wait = f"cooling down: last change {since_change:.0f} s ago of {policy.cooldown_seconds} s"
    if wait is not None:
        stable = current
    stepped = max(current - policy.max_step, min(current + policy.max_step, stable))
    desired = _clamp(stepped, policy)

    if desired > current:
        reason = f"scale up {current} -> {desired}: {because}"
    elif desired < current:
        reason = f"scale down {current} -> {desired}: {because}"
    elif wait is not None:
        reason = f"holding {current} (wants {raw}; {wait}): {because}"
    elif raw != current:
        held = "scale-up" if raw > current else "scale-down"
        reason = f"holding {current} (wants {raw}, within the {held} window or bounds): {because}"
    else:
        reason = f"steady at {current}: {because}"
    if ready is not None and ready < current:
        reason += f" ({current - ready} of {current} groups not ready yet)"
    if missing:
        reason += f"; unavailable: {', '.join(missing)} (no scale-down)"
    return Decision(desired, rec, reason, metrics_available=True, signal=signal)


def couple(
    prefill: Decision, *, current: int, decode: int, ratio: PerDecode, policy: Autoscaling
) -> Decision:
    """Prefill's decision kept within ``ratio.min..ratio.max`` groups per decode group, where
    ``decode`` is the groups decode will run (its own decision, already stabilised): prefill follows
    decode at once, so neither role starves the other, and its own metrics move it only within the
    bounds. Then clamped to prefill's minReplicas..maxReplicas, which win over the ratio."""
    lo = max(1, math.ceil(ratio.min * decode - 1e-9))
    hi = max(lo, math.floor(ratio.max * decode + 1e-9))
    bounded = _clamp(min(max(prefill.desired, lo), hi), policy)
    if bounded == prefill.desired:
        return prefill
    verb = "scale up" if bounded > current else "scale down" if bounded < current else "holding"
    reason = (
        f"{verb} {current} -> {bounded}: perDecode keeps prefill within {ratio.min:g}-{ratio.max:g}"
        f" groups per decode group ({decode} decode); own signal: {prefill.reason}"
    )
    return replace(prefill, desired=bounded, reason=reason, signal="perDecode")


def _clamp(replicas: int, policy: Autoscaling) -> int:
    return max(policy.min_replicas, min(policy.ceiling, replicas))


def prune(history: Sequence[Recommendation], *, policy: Autoscaling, now: float) -> list[Recommendation]:
    """Drop recommendations older than both windows: they can no longer matter."""
    horizon = max(policy.scale_up_window_seconds, policy.scale_down_window_seconds)
    return [r for r in history if r.at >= now - horizon]


@dataclass
class RoleMemory:
    """What an evaluator remembers of one role between evaluations: its recent recommendations, when
    its unbroken run of readings began, and when it last changed the role. The readings are in
    memory only: a new leader starts with none, so it holds until its own readings cover a window.
    The last change is also in status (lastScaleTime): a new leader starts from it (`seed`), so a
    restart or a failover does not cut the cooldown short."""

    history: list[Recommendation] = field(default_factory=list)
    since: float | None = None
    last_change: float | None = None
    last_reading: float | None = None
    """When the last evaluation read the metrics."""

    def decide(
        self,
        *,
        current: int,
        ready: int | None,
        samples: Mapping[MetricType, float | None],
        policy: Autoscaling,
        now: float,
        max_gap: float = math.inf,
    ) -> Decision:
        """`max_gap`: the longest time between two readings that still counts as an unbroken run (the
        loop: two intervals); after a longer one the run starts again, as after an outage."""
        if self.last_reading is not None and now - self.last_reading > max_gap:
            self.outage()
        self.last_reading = now
        if self.since is None:
            self.since = now
        decision = decide(
            current=current,
            samples=samples,
            policy=policy,
            history=self.history,
            now=now,
            ready=ready,
            since=self.since,
            last_change=self.last_change,
        )
        self.history = prune([*self.history, decision.recommendation], policy=policy, now=now)
        if not decision.metrics_available:
            self.outage()
        return decision

    def outage(self) -> None:
        """No reading: what came before says nothing about what comes after; start a new window."""
        self.history = []
        self.since = None

    def changed(self, now: float) -> None:
        """A new desired was written: the cooldown starts."""
        self.last_change = now

    def seed(self, last_change: float) -> None:
        """The last change as status records it (on this evaluator's clock), when this evaluator has
        made none of its own since it started, or a later one (a change this evaluator wrote whose
        answer was lost: it never learned it had made it)."""
        if self.last_change is None or last_change > self.last_change:
            self.last_change = last_change
