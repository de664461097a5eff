"""NetworkPolicies: who may open connections to a ModelDeployment's pods.

Two per ModelDeployment, both Ingress only:

- `NAME-engines` selects every serving pod (each role's leaders and LeaderWorkerSet workers: every
  pod of the ModelDeployment but the router's). They accept connections from:
  - the pods of the same ModelDeployment (label kubemoe.io/deployment), on every port: the router,
    and the group's other ranks (the torch.distributed store on --data-parallel-rpc-port, NCCL /
    gloo, vLLM's data-parallel RPC), LeaderWorkerSet workers reaching their leader, decode pods
    pulling KV from prefill pods (GET /v1/kv/..., NIXL);
  - the operator (pods labelled app.kubernetes.io/name=kubemoe, app.kubernetes.io/component=
    operator, in any namespace: the renderer does not know the operator's), on the API port: the
    autoscaler reads /metrics there when no Prometheus is set; with model.cache, on the fill pod's
    port too (render/model_cache.FILL_PORT: the operator reads its /progress into status.cache);
  - without a router (router.replicas 0, colocated), spec.router.allowFrom on the API port: the
    workers are then the front door.
- `NAME-router` (named like the router's Deployment, as its PodDisruptionBudget is) selects the
  router pods, which accept spec.router.allowFrom on the API port only
  (absent: every pod of the ModelDeployment's namespace).

NetworkPolicies add up: a scraper such as Prometheus, or a gateway the selectors do not describe,
is admitted by a NetworkPolicy of the user's own that selects the same pods. The labels the
policies rely on are the operator's; spec.pod.labels cannot set them (spec.py), but whoever may
create pods in the namespace can label one kubemoe.io/deployment=NAME.

Not restricted:
- Egress: engines download weights (hf://, s3://, a proxy, a mirror) from addresses the operator
  does not know, and resolve DNS; a cluster that limits egress does so in its own policies.
- The kubelet's probes: they come from the node's own network namespace, which the common network
  plugins (Calico, Cilium, Antrea, kube-router, kindnet) admit whatever the policies say. Where a
  plugin does not, a policy admitting the nodes' addresses is needed.
NetworkPolicies take effect only where the network plugin enforces them; elsewhere they are inert.
"""

from __future__ import annotations

from typing import Any, Final

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_ROLE, ROUTER
from kubemoe_operator.api.spec import ApiClient, ModelDeploymentSpec
from kubemoe_operator.plan.command import PORT
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.render.model_cache import FILL_PORT
from kubemoe_operator.render.names import Owner, metadata, router_name

OPERATOR_POD_LABELS: Final = {"app.kubernetes.io/name": "kubemoe", "app.kubernetes.io/component": "operator"}
"""The chart's operator pod (charts/kubemoe/templates/_helpers.tpl, kubemoe.selectorLabels)."""
API_PORT: Final = [{"protocol": "TCP", "port": PORT}]


def engines_policy_name(owner: str) -> str:
    return f"{owner}-engines"


def client_peer(client: ApiClient) -> dict[str, Any]:
    """One NetworkPolicyPeer from one spec.router.allowFrom entry."""
    if client.cidr is not None:
        return {"ipBlock": {"cidr": client.cidr}}
    pods = client.pod_labels
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(pods)} if pods else {}}
    if client.namespace_labels is not None:
        labels = client.namespace_labels
        peer["namespaceSelector"] = {"matchLabels": dict(labels)} if labels else {}
    return peer


def client_rules(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """The ingress rules admitting the API's clients ([] when allowFrom is [])."""
    clients = spec.router.allow_from
    peers = [{"podSelector": {}}] if clients is None else [client_peer(c) for c in clients]
    return [{"from": peers, "ports": API_PORT}] if peers else []


def _policy(
    *, owner: Owner, name: str, role: str | None, selector: dict[str, Any], ingress: list[Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner=owner, name=name, role=role),
        "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def network_policies(*, owner: Owner, spec: ModelDeploymentSpec, plan: Plan) -> list[dict[str, Any]]:
    own = {"podSelector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}
    operator_ports = API_PORT
    if spec.model.cache is not None:  # the fill pod is one of the deployment's pods too
        operator_ports = [*API_PORT, {"protocol": "TCP", "port": FILL_PORT}]
    engines: list[dict[str, Any]] = [{"from": [own]}, {"from": [operator], "ports": operator_ports}]
    has_router = plan.router.replicas > 0
    if not has_router:
        engines += client_rules(spec)
    not_router = {"key": LABEL_ROLE, "operator": "NotIn", "values": [ROUTER]}
    policies = [
        _policy(
            owner=owner,
            name=engines_policy_name(owner.name),
            role=None,
            selector={"matchLabels": {LABEL_DEPLOYMENT: owner.name}, "matchExpressions": [not_router]},
            ingress=engines,
        )
    ]
    if has_router:
        policies.append(
            _policy(
                owner=owner,
                name=router_name(owner.name),
                role=ROUTER,
                selector={"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_ROLE: ROUTER}},
                ingress=client_rules(spec),
            )
        )
    return policies
