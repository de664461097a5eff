"""The autoscaling-policy bench's simulation (bench/bench_autoscale_policy.py) on short traces: the facts
its table rests on, each of which the other policy, or a broken model, would fail."""

from __future__ import annotations

from bench_autoscale_policy import NEW, OLD, Run, Trace, simulate


def step_up(t: float) -> float:
    return 4.0 if t < 120 else 32.0  # one group's worth, then eight groups'


def step_down(t: float) -> float:
    return 32.0 if t < 120 else 4.0


def run_both(trace: Trace, *, minutes: float, groups: int = 1) -> tuple[Run, Run]:
    return (
        simulate(trace, minutes=minutes, policy=OLD, groups=groups),
        simulate(trace, minutes=minutes, policy=NEW, groups=groups),
    )


def test_both_policies_see_the_same_trace() -> None:
    old, new = run_both(step_up, minutes=15)
    assert [k.offered for k in old.ticks] == [k.offered for k in new.ticks]
    assert sum(k.offered for k in new.ticks) > 0


def test_the_new_policy_does_not_overshoot_while_groups_load_and_the_old_one_does() -> None:
    old, new = run_both(step_up, minutes=15)
    loading = [k for k in new.ticks if k.loading]
    assert loading, "groups were added and loaded"
    assert all(k.desired <= k.needed + 1 for k in loading), [(k.t, k.desired, k.needed) for k in loading]
    assert max(k.desired for k in new.ticks) >= 8, "and it reaches the load's need"
    assert old.overshoot > 1, old.overshoot
    assert old.group_seconds > new.group_seconds


def test_the_new_policy_drains_on_scale_down_and_the_old_one_drops_streams() -> None:
    old, new = run_both(step_down, minutes=20, groups=8)
    assert new.ticks[-1].desired < 8, "it scaled down"
    assert old.ticks[-1].desired < 8, "it scaled down"
    assert any(k.billed > k.desired for k in new.ticks), "a group drained (billed while it did)"
    assert new.lost_on_removal == 0
    assert old.lost_on_removal > 0
