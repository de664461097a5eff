"""The autoscaling decision, as tables: proportional, stabilised, stepped, clamped, and safe
when metrics are missing."""

from __future__ import annotations

import pytest

from kubemoe_operator.api.spec import Autoscaling, MetricTarget, MetricType
from kubemoe_operator.autoscale.decide import Decision, Recommendation, RoleMemory, decide, prune


def policy(*, up: int = 0, down: int = 300, step: int = 4, lo: int = 1, hi: int = 8) -> Autoscaling:
    return Autoscaling(
        min_replicas=lo,
        max_replicas=hi,
        metrics=[MetricTarget(type="queue-depth", target=4), MetricTarget(type="kv-cache-usage", target=0.8)],
        scale_up_window_seconds=up,
        scale_down_window_seconds=down,
        max_step=step,
    )


def run(
    current: int,
    samples: dict[MetricType, float | None],
    pol: Autoscaling,
    history: list[Recommendation] | None = None,
    now: float = 1000.0,
) -> Decision:
    return decide(current=current, samples=samples, policy=pol, history=history or [], now=now)


@pytest.mark.parametrize(
    ("current", "queue", "kv", "expected"),
    [
        (2, 4.0, 0.8, 2),  # on target
        (2, 4.3, 0.5, 2),  # within the 10 % band
        (2, 8.0, 0.5, 4),  # queue twice the target: double
        (2, 2.0, 1.2, 3),  # kv 1.5x target wins over a short queue
        (4, 0.0, 0.2, 1),  # idle: down to the minimum (no down window in history yet)
        (1, 100.0, 0.9, 5),  # far over: limited by max step 4
        (7, 100.0, 0.9, 8),  # and by maxReplicas
    ],
)
def test_proportional_recommendation(current: int, queue: float, kv: float, expected: int) -> None:
    assert run(current, {"queue-depth": queue, "kv-cache-usage": kv}, policy(down=0)).desired == expected


def test_missing_metrics_never_scale_down() -> None:
    pol = policy(down=0)
    only_kv_low = run(4, {"queue-depth": None, "kv-cache-usage": 0.1}, pol)
    assert only_kv_low.desired == 4
    assert "unavailable: queue-depth" in only_kv_low.reason
    only_kv_high = run(2, {"queue-depth": None, "kv-cache-usage": 1.6}, pol)
    assert only_kv_high.desired == 4  # available metrics may still scale up
    nothing = run(3, {"queue-depth": None, "kv-cache-usage": None}, pol)
    assert nothing.desired == 3
    assert not nothing.metrics_available
    assert "metrics unavailable" in nothing.reason


def test_scale_up_waits_for_the_up_window() -> None:
    pol = policy(up=60)
    # A burst 10 s ago is not enough when a recommendation inside the window said "stay".
    history = [Recommendation(950.0, 2), Recommendation(990.0, 6)]
    assert run(2, {"queue-depth": 12.0, "kv-cache-usage": 0.8}, pol, history).desired == 2
    # Sustained for the whole window: scale to the smallest recommendation in it.
    history = [Recommendation(930.0, 2), Recommendation(950.0, 5), Recommendation(990.0, 6)]
    assert run(2, {"queue-depth": 12.0, "kv-cache-usage": 0.8}, pol, history).desired == 5


def test_scale_down_waits_for_the_down_window() -> None:
    pol = policy(down=300)
    busy_recently = [Recommendation(800.0, 4), Recommendation(900.0, 1)]
    held = run(4, {"queue-depth": 0.0, "kv-cache-usage": 0.1}, pol, busy_recently)
    assert held.desired == 4
    assert "holding 4" in held.reason
    quiet_long = [Recommendation(650.0, 4), Recommendation(800.0, 1), Recommendation(900.0, 1)]
    assert run(4, {"queue-depth": 0.0, "kv-cache-usage": 0.1}, pol, quiet_long).desired == 1


def test_steady_load_never_flaps() -> None:
    pol = policy(up=30, down=120)
    history: list[Recommendation] = []
    current = 3
    noisy = [4.2, 3.7, 4.4, 3.9, 4.1, 3.6, 4.3, 4.0, 3.8, 4.4]
    for i, q in enumerate(noisy):
        d = run(current, {"queue-depth": q, "kv-cache-usage": 0.78}, pol, history, now=1000.0 + 15 * i)
        history.append(d.recommendation)
        assert d.desired == current, d.reason


def test_bounds_hold_even_when_already_outside() -> None:
    assert run(12, {"queue-depth": 4.0, "kv-cache-usage": 0.8}, policy()).desired == 8
    assert run(1, {"queue-depth": 4.0, "kv-cache-usage": 0.8}, policy(lo=2)).desired == 2


def test_prune_keeps_only_what_a_window_can_see() -> None:
    pol = policy(up=60, down=300)
    history = [Recommendation(t, 1) for t in (100.0, 650.0, 800.0, 990.0)]
    assert [r.at for r in prune(history, policy=pol, now=1000.0)] == [800.0, 990.0]


def test_a_huge_but_finite_reading_asks_for_the_ceiling_not_an_overflow() -> None:
    # 1e308 over a target of 0.8, times 4 groups: infinite; math.ceil raised OverflowError, outside
    # the loop's try, and the whole deployment's evaluation failed every interval
    decision = run(4, {"queue-depth": 4.0, "kv-cache-usage": 1e308}, policy(step=1))
    assert decision.desired == 5
    assert decision.signal == "kv-cache-usage"


def test_after_a_gap_in_evaluations_one_reading_does_not_scale() -> None:
    """The loop skipped the role for a while (the API server down, autoscaling off and on) without an
    outage: the run of readings then counted from before the gap, and the first reading after it met
    a "full window" alone. Steady at 4 until t=700, then one idle reading at t=1900."""
    memory = RoleMemory()
    pol = policy(down=300)
    steady: dict[MetricType, float | None] = {"queue-depth": 4.0, "kv-cache-usage": 0.8}
    for t in range(0, 701, 15):
        assert memory.decide(current=4, ready=4, samples=steady, policy=pol, now=t, max_gap=30).desired == 4
    idle: dict[MetricType, float | None] = {"queue-depth": 0.0, "kv-cache-usage": 0.1}
    decision = memory.decide(current=4, ready=4, samples=idle, policy=pol, now=1900, max_gap=30)
    assert decision.desired == 4
    assert "readings for 0 of the 300 s scale-down window" in decision.reason
    for t in range(1915, 1900 + 301, 15):  # a whole window of its own readings: then it may
        decision = memory.decide(current=4, ready=4, samples=idle, policy=pol, now=t, max_gap=30)
    assert decision.desired == 1


def test_a_later_change_in_status_restarts_the_cooldown() -> None:
    # this evaluator changed the role at t=100; its next write (t=400) applied but the answer was lost,
    # so it never called changed(); status's lastScaleTime says 400: the cooldown runs from there
    memory = RoleMemory()
    memory.changed(100.0)
    memory.seed(400.0)
    assert memory.last_change == 400.0
    memory.seed(50.0)  # an older record changes nothing
    assert memory.last_change == 400.0
