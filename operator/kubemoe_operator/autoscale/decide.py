"""The autoscaling decision: a pure function of (current replicas, samples, policy, history).

Per metric, the recommendation is proportional, as in the Horizontal Pod Autoscaler:
``ceil(current * value / target)``, left at ``current`` within a 10 % tolerance band. The
largest recommendation over the metrics wins. Then, in order:

1. missing metrics never scale down: with any metric unavailable the decision is at least
   ``current``; with all unavailable it is exactly ``current``;
2. stabilisation: scaling up takes the smallest recommendation of the scale-up window
   (the load must have lasted), scaling down the largest of the scale-down window (the
   quiet must have lasted) — so one noisy sample moves nothing, and nothing flaps;
3. at most ``maxStep`` groups added or removed;
4. clamped to ``minReplicas..maxReplicas``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kubemoe_operator.api.spec import Autoscaling, MetricType

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


def _per_metric(current: int, value: float, target: float) -> int:
    ratio = value / target
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return max(1, math.ceil(current * ratio))


def decide(
    *,
    current: int,
    samples: Mapping[MetricType, float | None],
    policy: Autoscaling,
    history: Sequence[Recommendation],
    now: float,
) -> Decision:
    """The replicas a role should have now. ``samples`` maps each policy metric to its per-group
    value, or None when it could not be read."""
    wanted: list[tuple[int, str]] = []
    missing: list[str] = []
    for metric in policy.metrics:
        value = samples.get(metric.type)
        if value is None or not math.isfinite(value) or value < 0:  # no reading is one to act on
            missing.append(metric.type)
            continue
        wanted.append(
            (
                _per_metric(current, value, metric.target),
                f"{metric.type} {value:.3g} (target {metric.target:g})",
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

    raw, because = max(wanted, key=lambda w: w[0])
    if missing:
        raw = max(raw, current)
    rec = Recommendation(now, raw)
    window = [*history, rec]
    if raw > current:
        recent = [r.replicas for r in window if r.at >= now - policy.scale_up_window_seconds]
        stable = max(current, min(recent))
    elif raw < current:
        recent = [r.replicas for r in window if r.at >= now - policy.scale_down_window_seconds]
        stable = min(current, max(recent))
    else:
        stable = current
    stepped = max(current - policy.max_step, min(current + policy.max_step, stable))
    desired = _clamp(stepped, policy)

    if desired > current:
        reason = f"scale up {current} -> {desired}: {because}"
    elif desired < current:
        reason = f"scale down {current} -> {desired}: {because}"
    elif raw != current:
        held = "scale-up" if raw > current else "scale-down"
        reason = f"holding {current} (wants {raw}, within the {held} window or bounds): {because}"
    else:
        reason = f"steady at {current}: {because}"
    if missing:
        reason += f"; unavailable: {', '.join(missing)} (no scale-down)"
    return Decision(desired, rec, reason, metrics_available=True)


def _clamp(replicas: int, policy: Autoscaling) -> int:
    return max(policy.min_replicas, min(policy.max_replicas, replicas))


def prune(history: Sequence[Recommendation], *, policy: Autoscaling, now: float) -> list[Recommendation]:
    """Drop recommendations older than both windows: they can no longer matter."""
    horizon = max(policy.scale_up_window_seconds, policy.scale_down_window_seconds)
    return [r for r in history if r.at >= now - horizon]
