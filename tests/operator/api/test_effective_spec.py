"""effective_spec: the replicas the reconciler renders and the autoscaler counts from. maxReplicas and
minReplicas hold from the first render, not only once the autoscaler has written a desired: a manifest
with replicas 10 and maxReplicas 4 rendered 10 groups, held them while the metrics could not be read,
then dropped 6 at once on the first readable interval (past maxStep and the scale-down window)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kubemoe_operator.api.desired import effective_spec
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.spec import MetricType, ModelDeploymentSpec
from kubemoe_operator.api.status import ModelDeploymentStatus, RoleStatus
from kubemoe_operator.autoscale.loop import Autoscaler
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.reconcile.reconcile import plan_for
from tests.operator.autoscale.cluster_kube import ClusterKube, tiny_moe


def _spec(body: dict[str, Any]) -> ModelDeploymentSpec:
    return parse_manifest({"apiVersion": body["apiVersion"], "kind": body["kind"], **body}).spec


def _decode(*, replicas: int, **autoscaling: Any) -> dict[str, Any]:
    return tiny_moe(replicas=replicas, autoscaling=autoscaling)


@pytest.mark.parametrize(
    ("replicas", "autoscaling", "renders"),
    [
        (10, {"minReplicas": 1, "maxReplicas": 4}, 4),
        (1, {"minReplicas": 3, "maxReplicas": 4}, 3),
        (2, {"minReplicas": 1, "maxReplicas": 4}, 2),
        (10, {"mode": "external"}, 10),  # its HPA or ScaledObject holds the bounds
    ],
)
@pytest.mark.parametrize("status", [None, ModelDeploymentStatus(roles={"decode": RoleStatus(replicas=10)})])
def test_spec_replicas_are_held_to_the_bounds_before_any_desired(
    replicas: int, autoscaling: dict[str, Any], renders: int, status: ModelDeploymentStatus | None
) -> None:
    spec = _spec(_decode(replicas=replicas, **autoscaling))
    out = effective_spec(spec, status)
    assert out.roles.decode is not None
    assert out.roles.decode.replicas == renders
    assert spec.roles.decode is not None
    assert spec.roles.decode.replicas == replicas, "spec itself is never changed"


def test_the_plan_renders_no_more_groups_than_max_replicas() -> None:
    body = _decode(replicas=10, minReplicas=1, maxReplicas=4)
    body["spec"]["model"]["source"] = "pvc://models/tiny-qwen3-moe"  # file:// is for `kubemoe up` only
    spec, plan = plan_for(name="tiny-moe", spec_raw=body["spec"], status=None, catalog=load_catalog())
    assert spec.roles.decode is not None
    assert spec.roles.decode.replicas == 4
    assert "D4x" in plan.layout


async def test_the_first_readable_interval_starts_from_max_replicas() -> None:
    kube = ClusterKube()
    body = kube.add(
        _decode(replicas=10, minReplicas=1, maxReplicas=4, metrics=[{"type": "queue-depth", "target": 4}])
    )

    class OnTarget:
        async def sample(
            self, sel: RoleSelector, metrics: Sequence[MetricType]
        ) -> dict[MetricType, float | None]:
            return {"queue-depth": 4.0}

    scaler = Autoscaler(kube=kube, source=OnTarget(), source_name="test", interval_s=15.0)
    (decode,) = await scaler.evaluate(body)
    assert decode.current == 4
    assert decode.new_desired is None  # steady at 4: nothing to cut
