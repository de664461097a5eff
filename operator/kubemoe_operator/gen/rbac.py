"""The RBAC the operator needs, exactly (no wildcards); the Helm chart ships it.

Why each rule:
- modeldeployments: kopf lists and watches them, and patches its own bookkeeping annotation
  after create/update handlers; the resync lists them.
- modeldeployments/status: the reconciler's merge patch of status.
- modeldeployments/finalizers: children carry blockOwnerDeletion owner references, which the
  OwnerReferencesPermissionEnforcement admission plugin allows only to who may update this.
- configmaps, services, networkpolicies, poddisruptionbudgets, deployments, leaderworkersets: the
  children: listed by label (observe), watched (kopf re-reconciles the owner), server-side
  applied (patch; create when applying a new object) and deleted (prune).
- persistentvolumeclaims, jobs: model.cache's claim (when the operator creates it) and the Job that
  fills it (render/model_cache.py), applied and pruned like the other children.
- podmonitors: one per deployment where the Prometheus operator's CRD is installed
  (render/monitoring.py), applied and pruned like the other children.
- pods: listed to explain Pending / failing pods in conditions, and to find group leaders (the
  autoscaler, the rebalancer); patched with a deletion cost; get/watch only because the Role
  below grants them and Kubernetes lets no one grant what it does not hold.
- serviceaccounts, roles, rolebindings: the children of an SGLang P/D deployment, whose
  sglang-router discovers its pods through the API (render/engines.py: get/list/watch pods in the
  namespace, nothing else).
- secrets (create only): the KV hand-off key of a disaggregated deployment (render/kv_key.py),
  made once; the operator never reads a Secret.
- events: an Event per decision, created, then patched (count, lastTimestamp) when the same or
  similar ones follow (kube/events.py, as client-go aggregates them); listed by reason
  (FailedCreate, SuccessfulCreate) to say why a workload's pods were never created.
- leases (in the operator's namespace only): leader election.
- namespaces, customresourcedefinitions (list/watch, cluster-wide even for one namespace): kopf's
  own observation of the namespaces and resources it serves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.resource import GROUP, PLURAL

CHILD_VERBS = ["get", "list", "watch", "create", "patch", "delete"]

CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": CHILD_VERBS},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": CHILD_VERBS},
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"], "verbs": CHILD_VERBS},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["podmonitors"], "verbs": CHILD_VERBS},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": CHILD_VERBS},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": CHILD_VERBS},
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": CHILD_VERBS},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": CHILD_VERBS,
    },
    # list: observe; patch: deletion cost; get and watch: held so that sglang-router's Role may grant them
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    # list: the controllers' FailedCreate Events, why a workload's pods were never created
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch", "list"]},
]

OBSERVE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
"""Cluster-scoped reads kopf makes even when it watches one namespace: it observes namespaces
(to follow the ones it serves) and CRDs (to discover its resources). Read-only."""

LEASE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
]


def cluster_role(name: str = "kubemoe-operator") -> dict[str, Any]:
    """ClusterRole for a cluster-wide operator (a Role with the same rules for one namespace)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [*CLUSTER_RULES, *OBSERVE_RULES],
    }


def lease_role(*, namespace: str, name: str = "kubemoe-operator-leader-election") -> dict[str, Any]:
    """Role in the operator's own namespace for its Lease."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": LEASE_RULES,
    }


def chart_rules_template() -> str:
    """charts/kubemoe/templates/_rules.tpl: these rules as Helm named templates, so the chart's
    ClusterRole/Role/lease Role are generated from this module (`make crds`; drift-tested)."""

    def block(name: str, rules: list[dict[str, Any]]) -> str:
        distinct = json.loads(json.dumps(rules))  # shared lists would become YAML anchors
        body = yaml.safe_dump(distinct, sort_keys=False, default_flow_style=None, width=200).rstrip()
        return f'{{{{- define "{name}" -}}}}\n{body}\n{{{{- end -}}}}\n'

    header = "{{/* Generated from operator/kubemoe_operator/gen/rbac.py by `make crds`; do not edit. */}}\n"
    return (
        header
        + block("kubemoe.operatorRules", CLUSTER_RULES)
        + block("kubemoe.observeRules", OBSERVE_RULES)
        + block("kubemoe.leaseRules", LEASE_RULES)
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("charts/kubemoe/templates/_rules.tpl")
    target.write_text(chart_rules_template())
