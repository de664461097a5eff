"""Whether to move experts, and where: a role's load under its current placement against the placement
plan/experts.py computes for it.

An expert-parallel group waits at every MoE layer for its busiest rank, so a step takes the sum over
layers of the busiest rank's load. The role's imbalance is that sum over the sum of the mean rank
loads (1.0: every rank equally busy), and the gain of a new placement is how much it lowers it.
A layer keeps its current placement unless the new one lowers its busiest rank's load, so no layer
gets worse; and nothing moves on too little traffic to say which experts are hot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kubemoe_operator.plan.experts import balance_layer, rank_loads

MIN_TOKENS_PER_EXPERT = 8
"""A layer's window must hold at least this many routed tokens per expert on average to be placed
anew: fewer say little about which experts are hot."""


@dataclass(frozen=True)
class Choice:
    slots: tuple[tuple[int, ...], ...]
    """The placement to apply (per layer); the current one where a layer does not improve."""
    before: float
    """The role's imbalance under the current placement."""
    predicted: float
    """The role's imbalance under `slots`, predicted from the same load."""
    layer_before: tuple[float, ...]
    layer_predicted: tuple[float, ...]
    moved: int
    """Physical slots whose expert changes (each one is an expert copy some rank loads)."""
    apply: bool
    reason: str


def _imbalance(loads: Sequence[float]) -> float:
    total = math.fsum(loads)
    return max(loads) * len(loads) / total if total > 0 else 1.0


def choose(
    tokens: Sequence[Sequence[int]],
    current: Sequence[Sequence[int]],
    *,
    ranks: int,
    redundant: int,
    min_improvement: float,
) -> Choice:
    """The placement for a role whose layers saw `tokens` under `current` (both per layer)."""
    new_slots: list[tuple[int, ...]] = []
    busiest_before, busiest_after, means = [], [], []
    layer_before, layer_after = [], []
    moved = 0
    thin = 0
    for load, slots in zip(tokens, current, strict=True):
        loads_now = rank_loads(load, slots, ranks=ranks)
        layer_before.append(_imbalance(loads_now))
        if sum(load) < MIN_TOKENS_PER_EXPERT * len(load):
            thin += 1
            placed, loads_new = tuple(slots), loads_now
        else:
            candidate = balance_layer(load, ranks=ranks, redundant=redundant)
            if max(candidate.rank_loads) < max(loads_now):
                placed, loads_new = candidate.slots, candidate.rank_loads
            else:
                placed, loads_new = tuple(slots), loads_now
        moved += sum(a != b for a, b in zip(placed, slots, strict=True))
        new_slots.append(placed)
        layer_after.append(_imbalance(loads_new))
        busiest_before.append(max(loads_now))
        busiest_after.append(max(loads_new))
        means.append(math.fsum(loads_now) / ranks)
    mean = math.fsum(means)
    before = math.fsum(busiest_before) / mean if mean > 0 else 1.0
    predicted = math.fsum(busiest_after) / mean if mean > 0 else 1.0
    gain = (before - predicted) / before
    if thin == len(tokens):
        apply, reason = False, "too little traffic in the window to place experts"
    elif moved == 0 or gain <= 0:
        apply, reason = False, f"imbalance {before:.2f}: no placement predicts better"
    elif gain < min_improvement:
        apply, reason = (
            False,
            (
                f"imbalance {before:.2f} -> {predicted:.2f} predicted: {gain:.1%} is below minImprovement "
                f"({min_improvement:.0%})"
            ),
        )
    else:
        apply, reason = (
            True,
            f"imbalance {before:.2f} -> {predicted:.2f} predicted, {moved} expert slots moved",
        )
    return Choice(
        slots=tuple(new_slots),
        before=before,
        predicted=predicted,
        layer_before=tuple(layer_before),
        layer_predicted=tuple(layer_after),
        moved=moved,
        apply=apply,
        reason=reason,
    )
