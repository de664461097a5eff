"""Status and conditions as pure functions, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubemoe_operator.api.status import Condition, ModelDeploymentStatus, RoleStatus
from kubemoe_operator.reconcile.observe import PodTrouble, WorkloadState, pod_trouble, workload_state
from kubemoe_operator.reconcile.status import Facts, compute_status, set_condition, status_apply

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
NO_TROUBLE = PodTrouble(pending={}, failing={}, reasons=())


def ws(wanted: int, ready: int, *, replicas: int | None = None, updated: int | None = None) -> WorkloadState:
    return WorkloadState(
        wanted=wanted,
        replicas=wanted if replicas is None else replicas,
        ready=ready,
        updated=wanted if updated is None else updated,
    )


def facts(**kw: object) -> Facts:
    base: dict[str, object] = {
        "generation": 2,
        "layout": "P1x(EP16) D1x(EP16)",
        "endpoint": "http://x.ns.svc:8000/v1",
    }
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def conds(status: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


READY_ROLES = {"prefill": ws(1, 1), "decode": ws(1, 1), "router": ws(2, 2)}


@pytest.mark.parametrize(
    ("name", "f", "phase", "expected"),
    [
        (
            "all ready",
            facts(roles=READY_ROLES),
            "Ready",
            {
                "Ready": ("True", "AllGroupsReady"),
                "Planned": ("True", "Planned"),
                "Progressing": ("False", "Stable"),
                "Degraded": ("False", "AsExpected"),
            },
        ),
        (
            "rolling out",
            facts(roles={**READY_ROLES, "decode": ws(1, 0)}),
            "Progressing",
            {"Ready": ("False", "GroupsNotReady"), "Progressing": ("True", "RollingOut")},
        ),
        (
            "pods pending",
            facts(
                roles={**READY_ROLES, "decode": ws(2, 1)},
                trouble=PodTrouble(
                    pending={"decode": 2}, failing={}, reasons=("0/4 nodes: Insufficient gpu",)
                ),
            ),
            "Progressing",
            {"Ready": ("False", "GroupsNotReady"), "Progressing": ("True", "PodsPending")},
        ),
        (
            "pods failing",
            facts(
                roles={**READY_ROLES, "decode": ws(1, 0)},
                trouble=PodTrouble(
                    pending={}, failing={"decode": 1}, reasons=("decode pod x: CrashLoopBackOff",)
                ),
            ),
            "Degraded",
            {"Degraded": ("True", "PodsFailing")},
        ),
        (
            "plan rejected",
            facts(plan_error="spec.roles.decode.parallelism: weights need 300 GiB"),
            "Failed",
            {
                "Planned": ("False", "PlanRejected"),
                "Ready": ("False", "PlanRejected"),
                "Progressing": ("False", "Blocked"),
            },
        ),
        (
            "lws missing",
            facts(lws_missing=True),
            "Failed",
            {"Planned": ("True", "Planned"), "Ready": ("False", "LeaderWorkerSetMissing")},
        ),
        (
            "apply failed",
            facts(roles=READY_ROLES, apply_error="apply Service ns/x: 422 Invalid"),
            "Failed",
            {"Ready": ("False", "ApplyFailed")},
        ),
        (
            "nothing exists yet",
            facts(roles={"decode": WorkloadState(wanted=1, exists=False)}),
            "Pending",
            {"Ready": ("False", "GroupsNotReady")},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_conditions_and_phase(name: str, f: Facts, phase: str, expected: dict[str, tuple[str, str]]) -> None:
    status = compute_status(old=None, facts=f, now=T0)
    assert status.phase == phase, name
    got = conds(status)
    for type, want in expected.items():
        assert got[type] == want, (name, type)
    assert all(c.observed_generation == 2 for c in status.conditions)
    assert [c.type for c in status.conditions] == ["Ready", "Planned", "Progressing", "Degraded"][: len(got)]


def test_role_that_served_and_lost_every_group_is_degraded() -> None:
    old = compute_status(old=None, facts=facts(roles=READY_ROLES), now=T0)
    new = compute_status(old=old, facts=facts(roles={**READY_ROLES, "decode": ws(1, 0)}), now=T1)
    assert conds(new)["Degraded"] == ("True", "GroupsUnavailable")
    assert new.phase == "Degraded"


def test_last_transition_time_kept_while_status_unchanged() -> None:
    first = compute_status(old=None, facts=facts(roles=READY_ROLES), now=T0)
    again = compute_status(old=first, facts=facts(roles=READY_ROLES), now=T1)
    assert again == first
    assert status_apply(old=first, new=again) is None
    flipped = compute_status(old=first, facts=facts(roles={**READY_ROLES, "decode": ws(1, 0)}), now=T1)
    times = {c.type: c.last_transition_time for c in flipped.conditions}
    assert times["Ready"] == T1
    assert times["Planned"] == T0


def test_set_condition_keeps_time_when_only_message_changes() -> None:
    c = set_condition([], type="Ready", status="False", reason="A", message="m1", generation=1, now=T0)
    c = set_condition(c, type="Ready", status="False", reason="B", message="m2", generation=2, now=T1)
    (only,) = c
    assert (only.reason, only.message, only.last_transition_time, only.observed_generation) == (
        "B",
        "m2",
        T0,
        2,
    )


def test_invalid_spec_keeps_roles_layout_and_endpoint() -> None:
    ready = compute_status(old=None, facts=facts(roles=READY_ROLES), now=T0)
    rejected = compute_status(old=ready, facts=facts(plan_error="nope"), now=T1)
    assert rejected.roles == ready.roles
    assert (rejected.layout, rejected.endpoint) == (ready.layout, ready.endpoint)


def test_apply_leaves_desired_to_the_autoscaler_and_drops_roles_no_longer_planned() -> None:
    old = ModelDeploymentStatus(
        roles={
            "decode": RoleStatus(replicas=1, ready=1, desired=3),
            "router": RoleStatus(replicas=1, ready=1),
        },
        conditions=[
            Condition(type="Ready", status="True", reason="AllGroupsReady", last_transition_time=T0),
        ],
    )
    new = compute_status(old=old, facts=facts(roles={"decode": ws(3, 1)}), now=T1)
    body = status_apply(old=old, new=new)
    assert body is not None
    assert body["roles"] == {"decode": {"replicas": 3, "ready": 1}}  # no desired; router left out
    assert body["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def _metrics_available(status: str) -> Condition:
    return Condition(
        type="MetricsAvailable", status=status, reason="MetricsRead", message="m", last_transition_time=T0
    )


def test_a_reconcile_from_a_stale_read_cannot_write_back_the_autoscalers_fields() -> None:
    """The race behind issue 12: a reconcile reads status (with the autoscaler's condition and
    desired), the autoscaler then removes both (autoscaling turned off), and the reconcile writes.
    Its write must not name either: an apply names only its own fields, and under server-side
    apply a field nobody names is gone for good. (A merge patch of the whole conditions list,
    as before, put the condition back.)"""
    read = compute_status(old=None, facts=facts(roles=READY_ROLES), now=T0)
    read = read.model_copy(
        update={
            "conditions": [*read.conditions, _metrics_available("True")],
            "roles": {**read.roles, "decode": read.roles["decode"].model_copy(update={"desired": 2})},
        }
    )
    new = compute_status(old=read, facts=facts(roles={**READY_ROLES, "decode": ws(3, 1)}), now=T1)
    body = status_apply(old=read, new=new)
    assert body is not None
    assert [c["type"] for c in body["conditions"]] == ["Ready", "Planned", "Progressing", "Degraded"]
    assert all("desired" not in role for role in body["roles"].values())
    assert set(body) <= {"observedGeneration", "phase", "conditions", "layout", "roles", "endpoint"}


def test_the_autoscalers_fields_alone_changing_is_no_reason_to_write() -> None:
    first = compute_status(old=None, facts=facts(roles=READY_ROLES), now=T0)
    theirs = first.model_copy(
        update={
            "conditions": [first.conditions[0], _metrics_available("False"), *first.conditions[1:]],
            "roles": {**first.roles, "decode": first.roles["decode"].model_copy(update={"desired": 4})},
        }
    )
    again = compute_status(old=theirs, facts=facts(roles=READY_ROLES), now=T1)
    assert status_apply(old=theirs, new=again) is None


@pytest.mark.parametrize(
    ("obj", "settled"),
    [
        (None, False),
        (
            {"kind": "LeaderWorkerSet", "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}},
            True,
        ),
        ({"kind": "LeaderWorkerSet", "status": {"replicas": 1, "readyReplicas": 1}}, False),
        (
            {
                "kind": "Deployment",
                "metadata": {"generation": 3},
                "status": {"observedGeneration": 2, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1},
            },
            False,
        ),
        (
            {
                "kind": "Deployment",
                "metadata": {"generation": 3},
                "status": {"observedGeneration": 3, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1},
            },
            True,
        ),
    ],
)
def test_workload_state(obj: dict[str, object] | None, settled: bool) -> None:
    assert workload_state(obj, wanted=1).settled is settled


SETTLED_COUNTS = {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}


def _lws(generation: int, **status: Any) -> dict[str, Any]:
    return {"kind": "LeaderWorkerSet", "metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    ("obj", "settled"),
    [
        # LWS v0.9 reports status.observedGeneration: counts from before the latest spec are stale.
        (_lws(2, observedGeneration=1, **SETTLED_COUNTS), False),
        (_lws(2, observedGeneration=2, **SETTLED_COUNTS), True),
        # Without it, its conditions' observedGeneration says which spec they describe.
        (
            _lws(
                3,
                conditions=[{"type": "Available", "status": "True", "observedGeneration": 2}],
                **SETTLED_COUNTS,
            ),
            False,
        ),
        (
            _lws(
                3,
                conditions=[{"type": "Available", "status": "True", "observedGeneration": 3}],
                **SETTLED_COUNTS,
            ),
            True,
        ),
        # Nothing observed yet: a new LeaderWorkerSet its controller has not looked at.
        (_lws(1), False),
        # Counts but no observedGeneration anywhere: a controller before v0.9, judged by its counts.
        (_lws(2, **SETTLED_COUNTS), True),
        (_lws(2, **{**SETTLED_COUNTS, "updatedReplicas": 0}), False),
        # A rolling update with groups left to replace is not settled, whatever the counts.
        (
            _lws(
                2,
                observedGeneration=2,
                conditions=[{"type": "UpdateInProgress", "status": "True", "observedGeneration": 2}],
                **SETTLED_COUNTS,
            ),
            False,
        ),
    ],
    ids=[
        "stale",
        "observed",
        "stale-conditions",
        "observed-conditions",
        "unobserved",
        "before-v0.9",
        "before-v0.9-rolling",
        "updating",
    ],
)
def test_leader_worker_set_is_current_only_once_its_controller_observed_the_spec(
    obj: dict[str, Any], settled: bool
) -> None:
    assert workload_state(obj, wanted=1).settled is settled


def test_pod_trouble_collects_scheduler_messages_and_crash_loops() -> None:
    pods: list[dict[str, Any]] = [
        {
            "metadata": {"name": "a", "labels": {"kubemoe.io/role": "decode"}},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "message": "0/4 nodes: 4 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
        },
        {
            "metadata": {"name": "b", "labels": {"kubemoe.io/role": "prefill"}},
            "status": {
                "phase": "Running",
                "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
            },
        },
        {
            "metadata": {"name": "c", "labels": {"kubemoe.io/role": "decode"}, "deletionTimestamp": "x"},
            "status": {},
        },
    ]
    trouble = pod_trouble(pods)
    assert trouble.pending == {"decode": 1}
    assert trouble.failing == {"prefill": 1}
    assert trouble.reasons == ("0/4 nodes: 4 Insufficient nvidia.com/gpu.", "prefill pod b: CrashLoopBackOff")
