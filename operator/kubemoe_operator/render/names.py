"""Names, labels and owner references that every rendered child shares (the label keys: api/labels.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubemoe_operator.api.labels import (
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    MANAGED_BY,
    ROUTER,
)
from kubemoe_operator.api.resource import API_VERSION, KIND


@dataclass(frozen=True, kw_only=True)
class Owner:
    """The ModelDeployment that owns every child."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def workload_name(owner: str, role: str) -> str:
    """LeaderWorkerSet or Deployment of one role; also its headless Service (the LWS subdomain)."""
    return f"{owner}-{role}"


def router_name(owner: str) -> str:
    return f"{owner}-{ROUTER}"


def plan_configmap_name(owner: str) -> str:
    return f"{owner}-plan"


def experts_configmap_name(owner: str, role: str) -> str:
    """A role's expert placement (placement.json, which its pods load at start) and the record of its
    last rebalance; written by the operator's rebalance loop, not by render."""
    return f"{owner}-{role}-experts"


def selector(owner: str, role: str) -> dict[str, str]:
    """Every pod of one role of one ModelDeployment."""
    return {LABEL_DEPLOYMENT: owner, LABEL_ROLE: role}


def labels(owner: str, role: str | None = None) -> dict[str, str]:
    """The recommended app.kubernetes.io labels plus kubemoe's own."""
    out = {
        "app.kubernetes.io/name": "kubemoe",
        "app.kubernetes.io/instance": owner,
        "app.kubernetes.io/part-of": "kubemoe",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DEPLOYMENT: owner,
    }
    if role is not None:
        out["app.kubernetes.io/component"] = role
        out[LABEL_ROLE] = role
    return out


def metadata(*, owner: Owner, name: str, role: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, role),
        "ownerReferences": [owner.reference()],
    }
