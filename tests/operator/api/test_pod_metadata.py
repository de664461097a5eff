"""Pod labels, annotations, tolerations, names and resources that Kubernetes refuses are refused
when the manifest is planned, by field: a LeaderWorkerSet accepts any pod template, and only its
controller would find one invalid, so the groups never started and the rollout never ended."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.crd_strategy import base_spec

MANIFEST = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"}}


def _spec(**parts: Any) -> dict[str, Any]:
    spec = base_spec("mixtral-8x7b")
    for path, value in parts.items():
        node = spec
        *head, last = path.split("__")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = copy.deepcopy(value)
    return spec


def _plan(spec: dict[str, Any]) -> Any:
    md = parse_manifest({**MANIFEST, "spec": spec})
    return md, plan_manifest(md)


REFUSED = [
    (_spec(pod__labels={"team": "a b c"}), "spec.pod.labels[team]"),
    (_spec(pod__labels={"ünï": "x"}), "spec.pod.labels[ünï]"),
    (_spec(pod__labels={"Example.com/team": "x"}), "spec.pod.labels[Example.com/team]"),
    (_spec(pod__labels={"team": "x" * 64}), "spec.pod.labels[team]"),
    (_spec(pod__annotations={"bad key!": "anything goes in a value"}), "spec.pod.annotations[bad key!]"),
    (_spec(scheduling__tolerations=[{"effect": "NoSchedule"}]), r"spec.scheduling.tolerations[0].operator"),
    (
        _spec(scheduling__tolerations=[{"key": "a", "operator": "Exists", "tolerationSeconds": 5}]),
        "spec.scheduling.tolerations[0].tolerationSeconds",
    ),
    (
        _spec(scheduling__tolerations=[{"key": "bad key!", "value": "x"}]),
        "spec.scheduling.tolerations[0].key",
    ),
    (_spec(scheduling__tolerations=[{"key": "k", "value": "x y"}]), "spec.scheduling.tolerations[0].value"),
    (_spec(scheduling__priorityClassName="High Priority"), "spec.scheduling.priorityClassName"),
    (
        _spec(roles__worker__pod={"labels": {"a/b/c": "x"}}),
        "spec.roles.worker.pod.labels[a/b/c]",
    ),
    (
        _spec(roles__worker__pod={"tolerations": [{"effect": "NoExecute"}]}),
        "spec.roles.worker.pod.tolerations[0].operator",
    ),
    (
        _spec(roles__worker__pod={"envFrom": [{"prefix": "1X_", "configMapRef": {"name": "c"}}]}),
        "spec.roles.worker.pod.envFrom[0].prefix",
    ),
    (
        _spec(roles__worker__resources={"limits": {"memory": "8Gi"}}),
        "spec.roles.worker.resources.limits.memory",
    ),
    (
        _spec(roles__worker__resources={"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}),
        "spec.roles.worker.resources.requests.cpu",
    ),
    (
        _spec(router__resources={"requests": {"memory": "1Gi"}, "limits": {"memory": "256Mi"}}),
        "spec.router.resources.requests.memory",
    ),
]


@pytest.mark.parametrize(("spec", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_what_kubernetes_refuses_is_refused_by_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as err:
        _plan(spec)
    assert field in {p.field for p in err.value.problems}, err.value


def test_what_kubernetes_takes_is_taken() -> None:
    spec = _spec(
        pod__labels={"example.com/team": "ml-infra", "tier": "", "v": "1.2_3"},
        pod__annotations={"k8s.v1.cni.cncf.io/networks": "rdma-net", "note": "any text at all"},
        scheduling__tolerations=[
            {"operator": "Exists"},
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            },
        ],
        scheduling__priorityClassName="high-priority.example.com",
        roles__worker__resources={"limits": {"memory": "1Ti", "cpu": "64"}},
    )
    _plan(spec)


def test_empty_and_case_insensitive_forms_kubernetes_takes_are_taken() -> None:
    # Kubernetes checks these only when not empty ("" is "not set"), and annotation keys in lower case
    spec = _spec(
        pod__annotations={"Example.com/Owner": "team-a"},
        scheduling__tolerations=[{"key": "", "operator": "Exists", "effect": "NoSchedule"}],
        scheduling__priorityClassName="",
        roles__worker__pod={
            "priorityClassName": "",
            "envFrom": [{"prefix": "", "configMapRef": {"name": "c"}}],
        },
    )
    _plan(spec)


def test_a_router_limit_below_the_default_request_lowers_the_request() -> None:
    # Kubernetes defaults a missing request to its limit; the router's default request (500m, 512Mi)
    # above a given limit made the router's pod invalid
    md, plan = _plan(_spec(router__resources={"limits": {"cpu": "250m", "memory": "256Mi"}}))
    objs = render(spec=md.spec, plan=plan, owner=Owner(name="m", namespace="ns", uid="u"), image="i")
    (router,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "m-router"]
    resources = router["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "250m", "memory": "256Mi"}
    assert resources["limits"] == {"cpu": "250m", "memory": "256Mi"}
