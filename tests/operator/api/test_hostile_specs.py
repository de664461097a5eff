"""Any spec the CRD's schema admits is planned or refused with a ManifestError, promptly: the
operator plans on its event loop, so a spec that hangs or crashes the planner would stop every
tenant's reconciles. Specs are the examples with up to four fields replaced by any value their
schema allows (crd_strategy.py), plus the cases the issue reproduced.

The time bound here is generous (a hang, not a speed measure, on a shared machine); the planner's
time per hostile spec is measured in bench/bench_hostile_specs.py."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.crd_strategy import EXAMPLES, base_spec, hostile_specs, spec_leaves, spec_schema

HANG_S = 1.0


def _plan_or_refuse(spec: dict[str, Any]) -> float:
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    start = time.perf_counter()
    with contextlib.suppress(ManifestError):
        plan_manifest(parse_manifest({**manifest, "spec": spec}))
    return time.perf_counter() - start


def test_the_mutations_reach_the_planner() -> None:
    assert len(spec_leaves(spec_schema())) > 60  # model config, engine, roles' parallelism, resources...
    for name in EXAMPLES:
        assert _plan_or_refuse(base_spec(name)) < HANG_S


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_specs())
def test_any_spec_the_schema_admits_is_planned_or_refused(spec: dict[str, Any]) -> None:
    assert _plan_or_refuse(spec) < HANG_S


def _tiny(**config: Any) -> dict[str, Any]:
    spec = base_spec("tiny-moe")
    spec["model"]["config"].update(config)
    return spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_tiny(numAttentionHeads=4611686018427387904), "numAttentionHeads"),
        (_tiny(numAttentionHeads=20_000_000), "numAttentionHeads"),
        (_tiny(hiddenSize=2, numAttentionHeads=4, headDim=None), "headDim"),
        (_tiny(hiddenSize=66, numAttentionHeads=4, headDim=None), "headDim"),
        (_tiny(numKeyValueHeads=3), "numKeyValueHeads"),
        (_tiny(expertsPerToken=9), "expertsPerToken"),
        (_tiny(numDenseLayers=4), "numDenseLayers"),  # tiny-moe has 3 layers
    ],
)
def test_the_reproduced_model_configs_are_refused_by_field(spec: dict[str, Any], field: str) -> None:
    spec["model"]["config"] = {k: v for k, v in spec["model"]["config"].items() if v is not None}
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    with pytest.raises(ManifestError, match=field):
        plan_manifest(parse_manifest({**manifest, "spec": spec}))


@pytest.mark.parametrize("memory", ["lots", "1e400", "99999Ei", "-1Gi", ""])
def test_a_quantity_kubernetes_would_refuse_is_refused_by_field(memory: str) -> None:
    spec = base_spec("tiny-moe")
    spec["roles"]["decode"]["resources"]["requests"]["memory"] = memory
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    with pytest.raises(ManifestError, match=r"spec\.roles\.decode\.resources\.requests: memory"):
        parse_manifest({**manifest, "spec": spec})
