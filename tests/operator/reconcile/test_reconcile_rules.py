"""The pure parts of a reconcile: autoscaler clamping, plan errors, events on transitions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kubemoe_operator.api.desired import effective_spec
from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.status import ModelDeploymentStatus, RoleStatus
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.reconcile.observe import WorkloadState
from kubemoe_operator.reconcile.reconcile import plan_for, transition_events
from kubemoe_operator.reconcile.status import Facts, compute_status
from tests.operator.helpers import EXAMPLES

DEEPSEEK = next(p for p in EXAMPLES if p.stem == "deepseek-v3")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def status_with_desired(**desired: int) -> ModelDeploymentStatus:
    return ModelDeploymentStatus(roles={k: RoleStatus(desired=v) for k, v in desired.items()})


@pytest.mark.parametrize(("desired", "replicas"), [(None, 1), (3, 3), (0, 1), (9, 4)])
def test_desired_is_clamped_to_min_and_max(desired: int | None, replicas: int) -> None:
    spec = load_manifest(DEEPSEEK).spec  # decode autoscales 1..4
    status = None if desired is None else status_with_desired(decode=desired)
    out = effective_spec(spec, status)
    assert out.roles.decode is not None
    assert out.roles.decode.replicas == replicas
    assert spec.roles.decode is not None
    assert spec.roles.decode.replicas == 1, "spec itself is never changed"


def test_desired_without_autoscaling_is_ignored() -> None:
    spec = load_manifest(DEEPSEEK).spec  # prefill does not autoscale
    assert effective_spec(spec, status_with_desired(prefill=3)) == spec


def test_plan_for_renders_desired_into_the_layout() -> None:
    raw = load_manifest(DEEPSEEK).model_dump(by_alias=True, mode="json", exclude_none=True)["spec"]
    _, plan = plan_for(name="d", spec_raw=raw, status=status_with_desired(decode=2), catalog=load_catalog())
    assert plan.layout == "P1x(EP16) D2x(EP16)"
    raw["roles"]["decode"]["parallelism"] = {"tensor": 1, "data": 2, "expert": 2}
    with pytest.raises(ManifestError, match=r"spec\.roles\.decode\.parallelism"):
        plan_for(name="d", spec_raw=raw, status=None, catalog=load_catalog())


def test_events_fire_on_transitions_only() -> None:
    ready = Facts(
        generation=1,
        layout="L",
        endpoint="e",
        roles={"decode": WorkloadState(wanted=1, replicas=1, ready=1, updated=1)},
    )
    first = compute_status(old=None, facts=ready, now=T0)
    assert [d.reason for d in transition_events(None, first)] == ["Planned", "Ready"]
    again = compute_status(old=first, facts=ready, now=T0)
    assert transition_events(first, again) == []
    rejected = compute_status(old=again, facts=Facts(generation=2, plan_error="bad"), now=T0)
    (event,) = transition_events(again, rejected)
    assert (event.reason, event.warning) == ("PlanRejected", True)
    missing = compute_status(old=None, facts=Facts(generation=1, layout="L", lws_missing=True), now=T0)
    assert [(d.reason, d.warning) for d in transition_events(None, missing)] == [
        ("Planned", False),
        ("LeaderWorkerSetMissing", True),
    ]
