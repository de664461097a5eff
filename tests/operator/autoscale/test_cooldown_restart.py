"""The cooldown outlives the evaluator: each change is written with status.roles.<role>.lastScaleTime
(as an HPA's lastScaleTime), and an autoscaler that starts (a restart, a new leader) counts its
cooldown from it. Before, the last change lived in memory only: after a failover the next scale-up
came a scale-up window after the last one, not a cooldown."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from kubemoe_operator.api.desired import parse_status
from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale.loop import Autoscaler
from kubemoe_operator.autoscale.signals import RoleSelector
from tests.operator.autoscale.cluster_kube import ClusterKube, tiny_moe

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Busy:
    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]:
        return {"queue-depth": 12.0}  # three times the target, all along


class Time:
    """Wall-clock seconds since T0; each autoscaler process has its own monotonic clock origin."""

    def __init__(self) -> None:
        self.s = 0.0

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.s)

    def monotonic(self, origin: float) -> float:
        return origin + self.s


def _decode(kube: ClusterKube) -> dict[str, object]:
    status = parse_status(kube.deployments[("ns", "tiny-moe")]["status"])
    assert status is not None
    role = status.roles["decode"]
    return {"desired": role.desired, "last": role.last_scale_time}


async def test_a_new_leader_keeps_the_cooldown_of_the_last_change() -> None:
    kube = ClusterKube()
    kube.add(
        tiny_moe(
            replicas=2,
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 8,
                "metrics": [{"type": "queue-depth", "target": 4}],
                "cooldownSeconds": 600,
            },
        )
    )
    now = Time()

    def autoscaler(origin: float) -> Autoscaler:
        return Autoscaler(
            kube=kube,
            source=Busy(),
            source_name="test",
            interval_s=15.0,
            clock=lambda: now.monotonic(origin),
            wall=now.wall,
        )

    old = autoscaler(origin=5000.0)
    for s in range(0, 61, 15):  # the scale-up window (60 s) of readings, then 2 -> 3
        now.s = float(s)
        await old.evaluate_all()
    assert _decode(kube) == {"desired": 3, "last": T0 + timedelta(seconds=60)}

    new = autoscaler(origin=-300.0)  # the old leader is gone; the new one's clock starts elsewhere
    scaled_at = None
    for s in range(75, 1000, 15):
        now.s = float(s)
        await new.evaluate_all()
        if _decode(kube)["desired"] != 3:
            scaled_at = s
            break
    assert scaled_at is not None
    assert scaled_at >= 60 + 600, f"scaled again {scaled_at - 60} s after the last change (cooldown 600 s)"
    assert _decode(kube) == {"desired": 4, "last": T0 + timedelta(seconds=scaled_at)}
