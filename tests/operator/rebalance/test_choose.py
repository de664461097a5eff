"""choose.py: when a role's experts move, and where."""

from __future__ import annotations

import pytest

from kubemoe_operator.plan.experts import default_slots, rank_loads
from kubemoe_operator.rebalance.choose import MIN_TOKENS_PER_EXPERT, choose


def _busiest_sum(tokens: list[list[int]], slots: tuple[tuple[int, ...], ...], ranks: int) -> float:
    return sum(max(rank_loads(t, s, ranks=ranks)) for t, s in zip(tokens, slots, strict=True))


def test_a_skewed_role_moves_and_each_layer_is_no_worse() -> None:
    hot = [800, 10, 10, 10, 10, 10, 10, 10]  # expert 0 hot: rank 0 of two does almost all the work
    even = [100] * 8
    tokens = [hot, even]
    current = (default_slots(8, 2, 2), default_slots(8, 2, 2))
    c = choose(tokens, current, ranks=2, redundant=2, min_improvement=0.05)
    assert c.apply, c.reason
    assert c.predicted < c.before
    assert c.moved > 0
    for t, now, new in zip(tokens, current, c.slots, strict=True):
        assert max(rank_loads(t, new, ranks=2)) <= max(rank_loads(t, now, ranks=2))
    # the role's figure is the step-time one: sum of busiest ranks over sum of mean rank loads
    mean = sum(sum(t) / 2 for t in tokens)
    assert c.before == pytest.approx(_busiest_sum(tokens, current, 2) / mean)
    assert c.predicted == pytest.approx(_busiest_sum(tokens, c.slots, 2) / mean)
    assert c.slots[1] == current[1] or max(rank_loads(even, c.slots[1], ranks=2)) < 400


def test_below_min_improvement_nothing_moves() -> None:
    tokens = [[110, 100, 100, 100, 100, 100, 100, 100]]
    current = (default_slots(8, 2),)
    c = choose(tokens, current, ranks=2, redundant=0, min_improvement=0.5)
    assert not c.apply
    assert "below minImprovement" in c.reason or "no placement" in c.reason


def test_too_little_traffic_moves_nothing() -> None:
    tokens = [[MIN_TOKENS_PER_EXPERT * 8 - 1, 0, 0, 0, 0, 0, 0, 0]]
    c = choose(tokens, (default_slots(8, 2),), ranks=2, redundant=0, min_improvement=0.0)
    assert not c.apply
    assert c.moved == 0
    assert "too little traffic" in c.reason


def test_an_even_load_moves_nothing() -> None:
    c = choose([[50] * 8], (default_slots(8, 4),), ranks=4, redundant=0, min_improvement=0.0)
    assert not c.apply
    assert c.before == pytest.approx(1.0)
