"""The kinds of children a ModelDeployment owns, and the lightkube classes that reach them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import ConfigMap, PersistentVolumeClaim, Pod, Service, ServiceAccount
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from kubemoe_operator.api.resource import GROUP, KIND, PLURAL, VERSION

ModelDeploymentResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
LeaderWorkerSet = create_namespaced_resource(
    "leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets"
)

PodMonitor = create_namespaced_resource("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors")

LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


@dataclass(frozen=True)
class ChildKind:
    api_version: str
    kind: str
    plural: str
    resource: Any
    """The lightkube resource class."""


CHILD_KINDS: tuple[ChildKind, ...] = (
    ChildKind("v1", "ConfigMap", "configmaps", ConfigMap),
    # sglang-router's identity for SGLang P/D (render/engines.py): it reads the role's pods
    ChildKind("v1", "ServiceAccount", "serviceaccounts", ServiceAccount),
    ChildKind("rbac.authorization.k8s.io/v1", "Role", "roles", Role),
    ChildKind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", RoleBinding),
    ChildKind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", NetworkPolicy),
    # model.cache (render/model_cache.py): the claim the operator creates, and the Job that fills it
    ChildKind("v1", "PersistentVolumeClaim", "persistentvolumeclaims", PersistentVolumeClaim),
    ChildKind("batch/v1", "Job", "jobs", Job),
    ChildKind("v1", "Service", "services", Service),
    ChildKind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", PodDisruptionBudget),
    ChildKind("apps/v1", "Deployment", "deployments", Deployment),
    ChildKind("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets", LeaderWorkerSet),
    ChildKind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors", PodMonitor),
)
BY_KIND = {k.kind: k for k in CHILD_KINDS}
POD = ChildKind("v1", "Pod", "pods", Pod)

ChildKey = tuple[str, str]
"""(kind, name) of one child; kinds are unique among CHILD_KINDS."""


def key_of(obj: dict[str, Any]) -> ChildKey:
    return str(obj["kind"]), str(obj["metadata"]["name"])
