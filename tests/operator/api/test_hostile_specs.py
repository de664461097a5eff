"""Any spec the CRD's schema admits is planned or refused with a ManifestError, promptly: the
operator plans on its event loop, so a spec that hangs or crashes the planner would stop every
tenant's reconciles. Specs are the examples with up to four fields replaced by any value their
schema allows (crd_strategy.py), plus the cases the issue reproduced.

The time bound here is generous (a hang, not a speed measure, on a shared machine); the planner's
time per hostile spec is measured in bench/bench_hostile_specs.py."""

from __future__ import annotations

import contextlib
import copy
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.crd_strategy import from_crd_schema

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ("tiny-moe", "deepseek-v3", "mixtral-8x7b", "qwen3-235b")
HANG_S = 1.0


@cache
def _spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]  # type: ignore[no-any-return]


def _leaves(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every settable field of the spec (each role name for the roles map)."""
    if schema.get("type") == "object" and schema.get("properties"):
        return [leaf for k, v in schema["properties"].items() for leaf in _leaves(v, (*path, k))]
    if path and path[-1] == "roles":
        return [
            leaf
            for r in ("prefill", "decode", "worker")
            for leaf in _leaves(schema["additionalProperties"], (*path, r))
        ]
    return [(path, schema)]


def _base(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())["spec"]
    return spec


@st.composite
def hostile_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(_base(draw(st.sampled_from(EXAMPLES))))
    leaves = _leaves(_spec_schema())
    for _ in range(draw(st.integers(1, 4))):
        path, schema = draw(st.sampled_from(leaves))
        node = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = draw(from_crd_schema(schema))
    return spec


def _plan_or_refuse(spec: dict[str, Any]) -> float:
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    start = time.perf_counter()
    with contextlib.suppress(ManifestError):
        plan_manifest(parse_manifest({**manifest, "spec": spec}))
    return time.perf_counter() - start


def test_the_mutations_reach_the_planner() -> None:
    assert len(_leaves(_spec_schema())) > 60  # model config, engine, roles' parallelism, resources...
    for name in EXAMPLES:
        assert _plan_or_refuse(_base(name)) < HANG_S


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_specs())
def test_any_spec_the_schema_admits_is_planned_or_refused(spec: dict[str, Any]) -> None:
    assert _plan_or_refuse(spec) < HANG_S


def _tiny(**config: Any) -> dict[str, Any]:
    spec = _base("tiny-moe")
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
        (_tiny(numDenseLayers=3), "numDenseLayers"),
    ],
)
def test_the_reproduced_model_configs_are_refused_by_field(spec: dict[str, Any], field: str) -> None:
    spec["model"]["config"] = {k: v for k, v in spec["model"]["config"].items() if v is not None}
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    with pytest.raises(ManifestError, match=field):
        plan_manifest(parse_manifest({**manifest, "spec": spec}))


@pytest.mark.parametrize("memory", ["lots", "1e400", "99999Ei", "-1Gi", ""])
def test_a_quantity_kubernetes_would_refuse_is_refused_by_field(memory: str) -> None:
    spec = _base("tiny-moe")
    spec["roles"]["decode"]["resources"]["requests"]["memory"] = memory
    manifest = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}
    with pytest.raises(ManifestError, match=r"spec\.roles\.decode\.resources\.requests: memory"):
        parse_manifest({**manifest, "spec": spec})
