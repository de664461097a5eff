"""A node affinity term's matchFields select by metadata.name, a node's name: a DNS subdomain of up to
253 characters, where matchExpressions' values are label values of at most 63. The schema (and the
CRD generated from it) bounds each as Kubernetes does."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.crd_strategy import base_spec
from tests.operator.helpers import pod_templates

TERM = (
    "spec.roles.decode.pod.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms[0]"
)
LONG_NODE = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters, a valid node name


def _manifest(term: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(base_spec("deepseek-v3"))
    required = {"nodeSelectorTerms": [term]}
    spec["roles"]["decode"]["pod"] = {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    }
    return {
        "apiVersion": "kubemoe.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m"},
        "spec": spec,
    }


def _refused_fields(term: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(_manifest(term)))
    return [p.field for p in err.value.problems]


def test_a_long_node_name_is_taken_and_reaches_the_pods() -> None:
    assert len(LONG_NODE) == 253
    requirement = {"key": "metadata.name", "operator": "In", "values": [LONG_NODE]}
    md = parse_manifest(_manifest({"matchFields": [requirement]}))
    objs = render(
        owner=Owner(name="m", namespace="ns", uid="u"), spec=md.spec, plan=plan_manifest(md), image="i"
    )
    decode = [t for t in pod_templates(objs) if t["metadata"]["labels"]["kubemoe.io/role"] == "decode"]
    assert decode
    for template in decode:
        terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert [requirement] in [t.get("matchFields") for t in terms["nodeSelectorTerms"]]


def test_a_node_name_over_253_characters_is_refused() -> None:
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [LONG_NODE + "d"]}]}
    assert f"{TERM}.matchFields[0].values[0]" in _refused_fields(term)


def test_a_label_value_stays_at_most_63_characters() -> None:
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a" * 64]}]}
    assert f"{TERM}.matchExpressions[0].values[0]" in _refused_fields(term)


def _term_schema() -> dict[str, Any]:
    node: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for part in (
        "roles",
        "decode",
        "pod",
        "affinity",
        "nodeAffinity",
        "requiredDuringSchedulingIgnoredDuringExecution",
    ):
        node = node["properties"][part]
    return node["properties"]["nodeSelectorTerms"]["items"]["properties"]  # type: ignore[no-any-return]


def test_the_crd_bounds_each_as_kubernetes_does() -> None:
    term = _term_schema()
    assert term["matchFields"]["items"]["properties"]["values"]["items"]["maxLength"] == 253
    assert term["matchExpressions"]["items"]["properties"]["values"]["items"]["maxLength"] == 63
