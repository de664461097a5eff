"""The autoscaling decision over load traces (step, ramp, spike, sawtooth, gaps, failover), on a small
model of a role: each new group serves only LOAD_S after it is added (MoE weights take minutes), and the
per-group queue the policy reads is the demand spread over the groups that serve.

What must hold, as #16 asks: no change before a full window of readings (after a start, a failover or
an outage); no overshoot while new groups load; no flapping under steady load; desired within one
group of the ideal once the windows have passed. The same trace under the old rule (recommendations
from every group, loading or not, and no full window) shows what the new one prevents.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from kubemoe_operator.api.spec import Autoscaling, MetricTarget
from kubemoe_operator.autoscale.decide import RoleMemory

TARGET = 4.0  # queued requests per group
INTERVAL_S = 15
LOAD_S = 300  # a new group's weights take five minutes to load
POLICY = Autoscaling(
    min_replicas=1,
    max_replicas=32,
    metrics=[MetricTarget(type="queue-depth", target=TARGET)],
    max_step=4,
)  # the defaults: scale-up window 60 s, scale-down window 600 s, cooldown 120 s

Demand = Callable[[float], float | None]
"""Total queued requests at a time (None: the metrics are unavailable then)."""


def ideal(total: float) -> int:
    return max(POLICY.min_replicas, min(POLICY.ceiling, math.ceil(total / TARGET)))


@dataclass
class Step:
    t: float
    groups: int
    ready: int
    desired: int
    reason: str


@dataclass
class Role:
    """Groups by the time they serve; the evaluator's memory; what each interval decided."""

    serving_at: list[float]
    memory: RoleMemory = field(default_factory=RoleMemory)
    steps: list[Step] = field(default_factory=list)

    def ready(self, t: float) -> int:
        return sum(1 for at in self.serving_at if at <= t)

    def evaluate(self, t: float, demand: Demand, *, old_rule: bool = False) -> None:
        total, ready = demand(t), self.ready(t)
        per_group = None if total is None else total / max(ready, 1)
        current = len(self.serving_at)
        if old_rule:  # every group counted, and no window of readings needed
            self.memory.since = -math.inf
        decision = self.memory.decide(
            current=current,
            ready=None if old_rule else ready,
            samples={"queue-depth": per_group},
            policy=POLICY,
            now=t,
        )
        if decision.desired != current:
            self.memory.changed(t)
        if decision.desired > current:
            self.serving_at += [t + LOAD_S] * (decision.desired - current)
        else:  # the newest groups (those still loading, first) go
            self.serving_at = sorted(self.serving_at)[: decision.desired]
        self.steps.append(Step(t, current, ready, decision.desired, decision.reason))


def run(demand: Demand, *, minutes: float, groups: int = 2, old_rule: bool = False, start: float = 0) -> Role:
    role = Role(serving_at=[-LOAD_S] * groups)  # serving from the start
    t = start
    while t < start + minutes * 60:
        role.evaluate(t, demand, old_rule=old_rule)
        t += INTERVAL_S
    return role


def step_to(before: float, after: float, at: float) -> Demand:
    return lambda t: before if t < at else after


def changes(role: Role) -> list[Step]:
    return [s for s in role.steps if s.desired != s.groups]


def test_nothing_changes_before_a_full_window_of_readings() -> None:
    # Far over target from the first reading: the scale-up waits for 60 s of readings.
    role = run(step_to(40, 40, 0), minutes=3)
    first = changes(role)[0]
    assert first.t >= POLICY.scale_up_window_seconds
    assert all(s.desired == s.groups for s in role.steps if s.t < POLICY.scale_up_window_seconds)
    assert "of the 60 s scale-up window" in role.steps[0].reason
    # Idle from the first reading: the scale-down waits for 600 s of them.
    idle = run(step_to(0, 0, 0), minutes=15, groups=6)
    assert changes(idle)[0].t >= POLICY.scale_down_window_seconds


def test_a_step_adds_the_groups_it_needs_once_and_does_not_overshoot_while_they_load() -> None:
    demand = step_to(8, 32, 120)  # 2 groups' worth, then 8 groups' worth
    role = run(demand, minutes=30)
    assert max(s.desired for s in role.steps) <= ideal(32) + 1, [(s.t, s.desired) for s in changes(role)]
    settled = [s for s in role.steps if s.t >= 120 + POLICY.scale_up_window_seconds + 2 * LOAD_S]
    assert all(abs(s.desired - ideal(32)) <= 1 for s in settled), settled[:3]
    # The old rule, on the same trace, keeps adding groups while the first ones load.
    old = run(demand, minutes=30, old_rule=True)
    assert max(s.desired for s in old.steps) > ideal(32) + 1


def test_steady_noisy_load_changes_nothing_for_ten_intervals() -> None:
    noise = random.Random(7)
    role = run(lambda t: 24 * (1 + noise.uniform(-0.05, 0.05)), minutes=20, groups=6)
    assert changes(role) == []
    assert len(role.steps) >= 10


def test_a_ramp_is_followed_within_one_group() -> None:
    role = run(lambda t: min(64.0, 4 + t / 30), minutes=60)  # +2 requests a minute, to 16 groups' worth
    late = [s for s in role.steps if s.t >= 40 * 60]
    assert all(abs(s.desired - ideal(64)) <= 1 for s in late)
    assert max(s.desired for s in role.steps) <= ideal(64) + 1


def test_a_spike_shorter_than_the_window_adds_nothing() -> None:
    role = run(lambda t: 60.0 if 600 <= t < 645 else 8.0, minutes=20)  # 45 s at 7x
    assert changes(role) == []


def test_a_sawtooth_does_not_flap() -> None:
    # 5 minutes at 8 groups' worth, 5 minutes at 2 groups' worth, over and over: shorter than the
    # scale-down window, so the groups stay once added.
    role = run(lambda t: 32.0 if (t // 300) % 2 == 0 else 8.0, minutes=60)
    downs = [s for s in changes(role) if s.desired < s.groups]
    assert downs == [], downs


def test_a_metrics_gap_starts_a_new_window() -> None:
    gap = (600, 660)
    role = run(lambda t: None if gap[0] <= t < gap[1] else (40.0 if t >= gap[0] else 8.0), minutes=15)
    during = [s for s in role.steps if gap[0] <= s.t < gap[1]]
    assert all(s.desired == s.groups for s in during)
    assert all("metrics unavailable" in s.reason for s in during)
    after = [s for s in changes(role) if s.t >= gap[1]]
    assert after, "it scales once a full window follows the gap"
    assert after[0].t >= gap[1] + POLICY.scale_up_window_seconds


def test_a_failover_holds_until_the_new_leaders_readings_cover_a_window() -> None:
    role = run(step_to(8, 8, 0), minutes=5)
    role.memory = RoleMemory()  # the new leader remembers nothing
    t = role.steps[-1].t + INTERVAL_S
    for i in range(8):
        role.evaluate(t + i * INTERVAL_S, step_to(40, 40, 0))
    after = role.steps[-8:]
    assert all(s.desired == s.groups for s in after if s.t < t + POLICY.scale_up_window_seconds)
    assert any(s.desired > s.groups for s in after)


def test_the_cooldown_spaces_changes() -> None:
    role = run(lambda t: min(120.0, 8 + t / 5), minutes=30)  # a steep ramp: a change at every chance
    times = [s.t for s in changes(role)]
    assert len(times) >= 2
    assert all(b - a >= POLICY.cooldown_seconds for a, b in itertools.pairwise(times))
