"""Pods a controller could not create (a quota, a PodSecurity level, a webhook) leave no pod to read:
their FailedCreate Events are what says why, in Degraded. Events of other objects, old ones and ones a
later SuccessfulCreate answered are left out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubemoe_operator.reconcile.observe import creation_failures
from kubemoe_operator.reconcile.status import REASON_NOT_CREATED
from tests.operator.reconcile.memory_kube import MemoryKube
from tests.operator.reconcile.test_reconcile import NS, conditions, reasons, run

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
QUOTA = 'pods "t-decode-0" is forbidden: exceeded quota: no-pods, requested: pods=1, limited: pods=0'


def event(
    kind: str, name: str, *, reason: str = "FailedCreate", at: datetime = NOW, **extra: Any
) -> dict[str, Any]:
    return {
        "kind": "Event",
        "metadata": {"name": f"{name}.{reason}.{at.timestamp()}", "namespace": NS},
        "involvedObject": {"kind": kind, "name": name, "namespace": NS},
        "reason": reason,
        "message": f"create Pod {name} failed error: {QUOTA}",
        "lastTimestamp": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


WORKLOADS = ("t-prefill", "t-decode", "t-router")


def failures(*events: dict[str, Any]) -> tuple[str, ...]:
    return creation_failures(events, workloads=WORKLOADS, since=NOW - timedelta(minutes=15))


def test_each_creator_of_the_workloads_pods_is_named_with_the_controllers_words() -> None:
    found = failures(
        event("StatefulSet", "t-decode"),  # a LeaderWorkerSet's leaders
        event("StatefulSet", "t-decode-3"),  # one group's workers
        event("ReplicaSet", "t-router-7d9f8b6c5"),  # a Deployment's, by its pod-template hash
    )
    assert [f.split(":")[0] for f in found] == [
        "ReplicaSet t-router-7d9f8b6c5",
        "StatefulSet t-decode",
        "StatefulSet t-decode-3",
    ]
    assert all("exceeded quota" in f for f in found)


def test_other_objects_old_events_and_answered_failures_are_left_out() -> None:
    assert not failures(
        event("StatefulSet", "t-decoder"),  # another deployment's workload, not a group of t-decode
        event("ReplicaSet", "t-router-prefill"),  # not a pod-template hash
        event("Pod", "t-decode-0"),
        event("StatefulSet", "t-prefill", at=NOW - timedelta(minutes=16)),
        event("StatefulSet", "t-decode", at=NOW - timedelta(minutes=2)),
        event("StatefulSet", "t-decode", reason="SuccessfulCreate", at=NOW - timedelta(minutes=1)),
    )


def test_the_newest_word_wins_whatever_the_time_format() -> None:
    """A failure after a success still counts; eventTime (micro) and lastTimestamp compare as times."""
    later = event("StatefulSet", "t-decode", lastTimestamp=None, eventTime="2026-12-02T12:00:00.500000Z")
    assert failures(event("StatefulSet", "t-decode", reason="SuccessfulCreate"), later)


async def test_a_reconcile_reports_pods_the_controller_could_not_create_as_degraded() -> None:
    kube = MemoryKube()
    await run(kube)
    kube.put(event("StatefulSet", "t-decode", at=datetime.now(UTC)))
    result = await run(kube)
    degraded = conditions(kube)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", REASON_NOT_CREATED)
    assert "StatefulSet t-decode: create Pod" in degraded["message"]
    assert "exceeded quota" in degraded["message"]
    assert "ResourceQuota" in degraded["message"]  # the fix
    assert kube.statuses[(NS, "t")]["phase"] == "Degraded"
    assert "Degraded" in reasons(result)
