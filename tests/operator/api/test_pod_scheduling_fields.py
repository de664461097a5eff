"""Node selectors, node affinity and volume mounts' subPath that Kubernetes refuses are refused when the
manifest is planned, naming the ModelDeployment's field: they planned, and failed only when the operator
applied the pods' workload (a Deployment refused at apply, naming its own field; a LeaderWorkerSet
whose controller could never create the StatefulSet), leaving the rollout half done."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.pod_metadata import local_path_problem
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.crd_strategy import base_spec
from tests.operator.helpers import pod_templates

MANIFEST = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"}}
DECODE = "spec.roles.decode.pod"
REQUIRED = "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
PREFERRED = "affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"


def _spec(*, scheduling: dict[str, Any] | None = None, pod: dict[str, Any] | None = None) -> dict[str, Any]:
    """deepseek-v3's spec (each role one LeaderWorkerSet group of 2 pods), with scheduling merged in and
    `pod` as roles.decode.pod."""
    spec = copy.deepcopy(base_spec("deepseek-v3"))
    spec["scheduling"].update(copy.deepcopy(scheduling or {}))
    if pod is not None:
        spec["roles"]["decode"]["pod"] = copy.deepcopy(pod)
    return spec


def _required(*requirements: dict[str, Any], fields: bool = False) -> dict[str, Any]:
    term = {"matchFields" if fields else "matchExpressions": list(requirements)}
    return {
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
        }
    }


def _preferred(*requirements: dict[str, Any]) -> dict[str, Any]:
    preferred = [{"weight": 10, "preference": {"matchExpressions": list(requirements)}}]
    return {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}}


def _mount(**mount: str) -> dict[str, Any]:
    return {
        "volumes": [{"name": "data", "emptyDir": {}}],
        "volumeMounts": [{"name": "data", "mountPath": "/mnt/data", **mount}],
    }


def _problems(spec: dict[str, Any]) -> list[Problem]:
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest({**MANIFEST, "spec": spec}))
    return err.value.problems


REFUSED = [
    (_spec(scheduling={"nodeSelector": {"bad key!": "a b c"}}), "spec.scheduling.nodeSelector[bad key!]"),
    (_spec(scheduling={"nodeSelector": {"zone": "a b c"}}), "spec.scheduling.nodeSelector[zone]"),
    (
        _spec(scheduling={"nodeSelector": {"Example.com/zone": "a"}}),
        "spec.scheduling.nodeSelector[Example.com/zone]",
    ),
    (_spec(pod={"nodeSelector": {"zone": "us east/1"}}), f"{DECODE}.nodeSelector[zone]"),
    (_spec(pod={"nodeSelector": {"/zone": "a"}}), f"{DECODE}.nodeSelector[/zone]"),
    (
        _spec(pod=_required({"key": "zone!!", "operator": "Exists"})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].key",
    ),
    (
        _spec(pod=_required({"key": "zone", "operator": "In"})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "zone", "operator": "NotIn", "values": []})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "zone", "operator": "Exists", "values": ["a"]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "zone", "operator": "DoesNotExist", "values": ["a"]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "gen", "operator": "Gt"})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "gen", "operator": "Lt", "values": ["3", "4"]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "gen", "operator": "Gt", "values": ["three"]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "gen", "operator": "Gt", "values": [str(2**63)]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "zone", "operator": "In", "values": ["ok", "us east"]})),
        f"{DECODE}.{REQUIRED}.matchExpressions[0].values[1]",
    ),
    (
        _spec(pod=_preferred({"key": "zone!!", "operator": "Exists"})),
        f"{DECODE}.{PREFERRED}.matchExpressions[0].key",
    ),
    (
        _spec(pod=_preferred({"key": "zone", "operator": "In"})),
        f"{DECODE}.{PREFERRED}.matchExpressions[0].values",
    ),
    (
        _spec(pod=_required({"key": "metadata.uid", "operator": "In", "values": ["n1"]}, fields=True)),
        f"{DECODE}.{REQUIRED}.matchFields[0].key",
    ),
    (
        _spec(pod=_required({"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}, fields=True)),
        f"{DECODE}.{REQUIRED}.matchFields[0].values",
    ),
    (
        _spec(pod=_required({"key": "metadata.name", "operator": "Exists"}, fields=True)),
        f"{DECODE}.{REQUIRED}.matchFields[0].operator",
    ),
    (
        _spec(pod=_required({"key": "metadata.name", "operator": "In", "values": ["Node_1"]}, fields=True)),
        f"{DECODE}.{REQUIRED}.matchFields[0].values[0]",
    ),
    (_spec(pod=_mount(subPath="/etc/../../abs")), f"{DECODE}.volumeMounts[0].subPath"),
    (_spec(pod=_mount(subPath="/abs")), f"{DECODE}.volumeMounts[0].subPath"),
    (_spec(pod=_mount(subPath="a/../../b")), f"{DECODE}.volumeMounts[0].subPath"),
    (_spec(pod=_mount(subPath="..")), f"{DECODE}.volumeMounts[0].subPath"),
    (_spec(pod=_mount(subPathExpr="$(POD)/../x")), f"{DECODE}.volumeMounts[0].subPathExpr"),
    (_spec(pod=_mount(subPath="a", subPathExpr="$(POD)")), f"{DECODE}.volumeMounts[0].subPathExpr"),
]


@pytest.mark.parametrize(
    ("spec", "field"), REFUSED, ids=[f.rsplit(".", 1)[-1] + str(i) for i, (_, f) in enumerate(REFUSED)]
)
def test_what_kubernetes_refuses_is_refused_by_field_with_a_fix(spec: dict[str, Any], field: str) -> None:
    problems = {p.field: p for p in _problems(spec)}
    assert field in problems, problems
    assert problems[field].fix


def test_router_pod_fields_are_checked_alike() -> None:
    spec = _spec()
    spec["router"]["pod"] = {"nodeSelector": {"zone": "a b"}, **_mount(subPath="/x")}
    fields = {p.field for p in _problems(spec)}
    assert {"spec.router.pod.nodeSelector[zone]", "spec.router.pod.volumeMounts[0].subPath"} <= fields


def test_fixes_say_what_to_do() -> None:
    by_field = {
        p.field: p for p in _problems(_spec(pod=_required({"key": "gen", "operator": "Gt", "values": ["x"]})))
    }
    gt = by_field[f"{DECODE}.{REQUIRED}.matchExpressions[0].values"]
    assert "integer" in gt.message
    assert "'x'" in gt.message
    (empty,) = _problems(_spec(pod=_required({"key": "zone", "operator": "In"})))
    assert "at least one value" in empty.message
    assert "Exists" in empty.fix
    (sub,) = _problems(_spec(pod=_mount(subPath="/etc/../../abs")))
    assert "relative" in sub.message
    assert "'..'" in sub.fix


def test_what_kubernetes_takes_is_taken_and_reaches_the_pods() -> None:
    pod = {
        "nodeSelector": {"topology.kubernetes.io/zone": "us-east-1a", "example.com/empty": ""},
        **_mount(subPath="models/v3", subPathExpr=""),
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "zone", "operator": "In", "values": ["a", "b"]},
                                {"key": "example.com/gen", "operator": "Gt", "values": ["3"]},
                                {"key": "example.com/gen", "operator": "Lt", "values": ["10"]},
                                {"key": "spot", "operator": "DoesNotExist"},
                            ],
                            "matchFields": [
                                {"key": "metadata.name", "operator": "NotIn", "values": ["node-1"]}
                            ],
                        }
                    ]
                },
                # a preferred term may carry values no label has (Kubernetes checks them in required terms)
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 5,
                        "preference": {
                            "matchExpressions": [{"key": "z", "operator": "NotIn", "values": ["a b"]}]
                        },
                    }
                ],
            }
        },
    }
    spec = _spec(scheduling={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200", "rack": ""}}, pod=pod)
    md = parse_manifest({**MANIFEST, "spec": spec})
    plan = plan_manifest(md)
    assert plan.role("decode").workload == "LeaderWorkerSet"
    assert plan.role("decode").pods_per_group == 2
    objs = render(spec=md.spec, plan=plan, owner=Owner(name="m", namespace="ns", uid="u"), image="i")
    decode = [t for t in pod_templates(objs) if t["metadata"]["labels"].get("kubemoe.io/role") == "decode"]
    assert len(decode) == 2  # the leader's and the worker's template
    for template in decode:
        assert template["spec"]["nodeSelector"]["topology.kubernetes.io/zone"] == "us-east-1a"
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/mnt/data"]["subPath"] == "models/v3"


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("a/b", False),
        ("a..b/...", False),  # '..' only as a whole component steps out
        ("./a", False),
        ("a/", False),
        ("/a", True),
        ("a/../b", True),
        ("../a", True),
        ("a/..", True),
    ],
)
def test_a_sub_path_stays_within_its_volume(path: str, refused: bool) -> None:
    assert (local_path_problem(path) is not None) == refused
