"""NetworkPolicies (render/network.py): engine pods admit only their own ModelDeployment's pods and the
operator's scrapes; the router (or, without one, the workers) admits spec.router.allowFrom on the API
port; every rendered child passes Kubernetes' own schema; the new fields are checked."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_ROLE, ROUTER
from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.render.model_cache import FILL_PORT
from kubemoe_operator.render.network import OPERATOR_POD_LABELS
from tests.operator.helpers import BASE, EXAMPLES, REPO, pod_templates

UID = "00000000-0000-4000-8000-000000000000"
KUBE_VERSION = "1.36.0"  # the e2e cluster's
NS = "ns"
NS_LABELS = {"kubernetes.io/metadata.name": NS}


def render_data(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    return render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace=NS, uid=UID), image="i"
    )


def render_router(**router: Any) -> list[dict[str, Any]]:
    data = copy.deepcopy(BASE)
    data["spec"]["router"] = router
    return render_data(data)


def colocated(**router: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"]["serving"] = {"mode": "colocated"}
    data["spec"]["roles"] = {"worker": {"parallelism": {"data": 2}}}
    data["spec"]["router"] = router
    return data


def policies(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}


# --- a label-selector evaluator, to ask the policies who gets in -----------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def admits(policy: dict[str, Any], *, pod: dict[str, str], namespace: dict[str, str], port: int) -> bool:
    """Whether `policy` lets a pod labelled `pod` in a namespace labelled `namespace` connect to `port`
    (of the pods it selects; the policy's own namespace is NS)."""
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule.get("from", [{}]):
            if "ipBlock" in peer:
                continue
            ns_ok = (
                selects(peer["namespaceSelector"], namespace)
                if "namespaceSelector" in peer
                else namespace == NS_LABELS
            )
            if ns_ok and selects(peer.get("podSelector", {}), pod):
                return True
    return False


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_engines_admit_their_deployment_and_the_operator_only(path: Any) -> None:
    md = load_manifest(path)
    name = md.metadata.name
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name=name, namespace=NS, uid=UID), image="i"
    )
    engines = policies(objs)[f"{name}-engines"]
    assert engines["spec"]["policyTypes"] == ["Ingress"]  # egress open: weights come from anywhere
    templates = pod_templates(objs)
    router_labels = [
        t["metadata"]["labels"] for t in templates if t["metadata"]["labels"][LABEL_ROLE] == ROUTER
    ]
    engine_labels = [
        t["metadata"]["labels"] for t in templates if t["metadata"]["labels"][LABEL_ROLE] != ROUTER
    ]
    assert engine_labels
    assert all(selects(engines["spec"]["podSelector"], labels) for labels in engine_labels)
    assert not any(selects(engines["spec"]["podSelector"], labels) for labels in router_labels)
    for peer in [*engine_labels, *router_labels]:  # ranks, the store port, KV pulls, the router: any port
        assert admits(engines, pod=peer, namespace=NS_LABELS, port=29550)
    operator_ns = {"kubernetes.io/metadata.name": "kubemoe-system"}
    assert admits(engines, pod=dict(OPERATOR_POD_LABELS), namespace=operator_ns, port=8000)
    assert not admits(engines, pod=dict(OPERATOR_POD_LABELS), namespace=operator_ns, port=29550)
    stranger = {"app": "curl"}
    if md.spec.router.replicas > 0:
        assert not admits(engines, pod=stranger, namespace=NS_LABELS, port=8000)
    other = {LABEL_DEPLOYMENT: "other-model", LABEL_ROLE: "decode"}
    assert not admits(engines, pod=other, namespace=NS_LABELS, port=29550)


@pytest.mark.parametrize("example", ["qwen3-30b-a3b-model-cache", "mixtral-8x7b"])
def test_the_operator_reaches_the_fill_pods_progress(example: str) -> None:
    # the fill pod carries the deployment's label, so the engines policy selects it: without its
    # port in the operator's rule, status.cache never showed bytes or files on an enforcing CNI
    md = load_manifest(REPO / "examples" / f"{example}.yaml")
    name = md.metadata.name
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name=name, namespace=NS, uid=UID), image="i"
    )
    engines = policies(objs)[f"{name}-engines"]
    operator_ns = {"kubernetes.io/metadata.name": "kubemoe-system"}
    fills = [o for o in objs if o["kind"] == "Job"]
    assert bool(fills) == (md.spec.model.cache is not None)
    for job in fills:
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert selects(engines["spec"]["podSelector"], labels)
        port = job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        assert port == FILL_PORT
    admitted = admits(engines, pod=dict(OPERATOR_POD_LABELS), namespace=operator_ns, port=FILL_PORT)
    assert admitted == bool(fills)


def test_the_router_admits_its_namespace_on_the_api_port_by_default() -> None:
    objs = render_router()
    router = policies(objs)["t-router"]
    (template,) = [t for t in pod_templates(objs) if t["metadata"]["labels"][LABEL_ROLE] == ROUTER]
    assert selects(router["spec"]["podSelector"], template["metadata"]["labels"])
    assert admits(router, pod={"app": "anything"}, namespace=NS_LABELS, port=8000)
    assert not admits(router, pod={"app": "anything"}, namespace=NS_LABELS, port=9000)
    assert not admits(
        router, pod={"app": "anything"}, namespace={"kubernetes.io/metadata.name": "x"}, port=8000
    )
    engines = policies(objs)["t-engines"]
    assert not admits(engines, pod={"app": "anything"}, namespace=NS_LABELS, port=8000)


def test_allow_from_entries_become_peers() -> None:
    gateway = {"namespaceLabels": {"team": "edge"}, "podLabels": {"app": "gateway"}}
    everyone = [{"namespaceLabels": {}}, {"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]
    router = policies(render_router(allowFrom=[gateway, *everyone]))["t-router"]
    (rule,) = router["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {
            "podSelector": {"matchLabels": {"app": "gateway"}},
            "namespaceSelector": {"matchLabels": {"team": "edge"}},
        },
        {"podSelector": {}, "namespaceSelector": {}},
        {"ipBlock": {"cidr": "0.0.0.0/0"}},
        {"ipBlock": {"cidr": "::/0"}},
    ]
    assert admits(router, pod={"app": "gateway"}, namespace={"team": "edge"}, port=8000)
    assert admits(router, pod={"x": "y"}, namespace={"kubernetes.io/metadata.name": "far"}, port=8000)
    only = policies(render_router(allowFrom=[gateway]))["t-router"]
    assert not admits(only, pod={"app": "gateway"}, namespace=NS_LABELS, port=8000)
    assert not admits(only, pod={"app": "other"}, namespace={"team": "edge"}, port=8000)


def test_an_empty_allow_from_admits_no_client() -> None:
    router = policies(render_router(allowFrom=[]))["t-router"]
    assert router["spec"]["ingress"] == []


def test_without_a_router_the_workers_admit_the_clients() -> None:
    objs = render_data(colocated(replicas=0, allowFrom=[{"namespaceLabels": {"team": "a"}}]))
    assert set(policies(objs)) == {"t-engines"}
    engines = policies(objs)["t-engines"]
    assert admits(engines, pod={"app": "c"}, namespace={"team": "a"}, port=8000)
    assert not admits(engines, pod={"app": "c"}, namespace={"team": "a"}, port=29550)
    assert not admits(engines, pod={"app": "c"}, namespace={"team": "b"}, port=8000)
    with_router = render_data(colocated(replicas=1))
    assert not admits(policies(with_router)["t-engines"], pod={"app": "c"}, namespace=NS_LABELS, port=8000)


def test_policies_come_before_any_pod() -> None:
    kinds = [o["kind"] for o in render_router()]
    first_workload = min(kinds.index(k) for k in ("Deployment", "LeaderWorkerSet") if k in kinds)
    assert max(i for i, k in enumerate(kinds) if k == "NetworkPolicy") < first_workload


def test_operator_labels_are_the_charts() -> None:
    chart = (REPO / "charts" / "kubemoe" / "Chart.yaml").read_text()
    helpers = (REPO / "charts" / "kubemoe" / "templates" / "_helpers.tpl").read_text()
    selector = helpers[helpers.index('define "kubemoe.selectorLabels"') :]
    selector = selector[: selector.index("end")]
    assert re.search(r"^name: kubemoe$", chart, re.M)
    assert OPERATOR_POD_LABELS["app.kubernetes.io/name"] == "kubemoe"
    assert "app.kubernetes.io/name: {{ .Chart.Name }}" in selector
    assert f"app.kubernetes.io/component: {OPERATOR_POD_LABELS['app.kubernetes.io/component']}" in selector


@pytest.mark.parametrize(
    ("router", "field"),
    [
        ({"allowFrom": [{"cidr": "10.0.0.0/8", "podLabels": {"a": "b"}}]}, "cidr"),
        ({"allowFrom": [{"cidr": "10.0.0.1/8"}]}, "cidr"),
        ({"allowFrom": [{"cidr": "10.0.0.0/99"}]}, "cidr"),
        ({"allowFrom": [{"namespaceLabels": {"a": "b"}}] * 17}, "allowFrom"),
        ({"apiKeySecret": "Not_A_Name"}, "apiKeySecret"),
    ],
)
def test_bad_router_fields_are_refused_by_field(router: dict[str, Any], field: str) -> None:
    data = copy.deepcopy(BASE)
    data["spec"]["router"] = router
    with pytest.raises(ManifestError, match=field):
        parse_manifest(data)


def test_api_keys_need_a_router() -> None:
    with pytest.raises(ManifestError, match="apiKeySecret"):
        parse_manifest(colocated(replicas=0, apiKeySecret="keys"))


# --- Kubernetes' own schema ------------------------------------------------------------------------


def _validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "LeaderWorkerSet":  # a CRD: its pod templates are checked as PodTemplates
        lwt = obj["spec"]["leaderWorkerTemplate"]
        for template in (lwt["leaderTemplate"], lwt["workerTemplate"]):
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "x"},
                "template": template,
            }
            kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "path", [*EXAMPLES, REPO / "e2e" / "manifests" / "mixtral-h200.yaml"], ids=lambda p: p.stem
)
def test_every_child_passes_the_kubernetes_schema(path: Any) -> None:
    md = load_manifest(path)
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="m", namespace=NS, uid=UID), image="i"
    )
    for obj in objs:
        _validate(obj)


def test_every_router_option_passes_the_kubernetes_schema() -> None:
    clients = [
        {"namespaceLabels": {"team": "a"}, "podLabels": {"app": "b"}},
        {"namespaceLabels": {}},
        {"cidr": "fd00::/8"},
    ]
    for objs in (
        render_router(allowFrom=clients, apiKeySecret="keys"),
        render_router(allowFrom=[]),
        render_data(colocated(replicas=0, allowFrom=clients)),
    ):
        for obj in objs:
            _validate(obj)
