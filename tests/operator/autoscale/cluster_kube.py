"""A `Kube` double for the autoscaler's loop: MemoryKube (its Events, its status store) plus what the
loop reads of a cluster: ModelDeployments listed and read again, status applied with the
resourceVersion check (a stale one is a no-op, as the API's 409), and pods listed by label."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_LEADER, LABEL_ROLE
from kubemoe_operator.render.pods import LWS_GROUP_INDEX
from tests.operator.reconcile.memory_kube import MemoryKube, applied

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny-moe.yaml"


def tiny_moe(*, name: str = "tiny-moe", namespace: str = "ns", **decode: Any) -> dict[str, Any]:
    """examples/tiny-moe.yaml as the API serves it, with `decode` merged into its decode role."""
    body: dict[str, Any] = yaml.safe_load(TINY.read_text())
    body["metadata"] = {"name": name, "namespace": namespace, "generation": 1}
    body["spec"]["roles"]["decode"].update(decode)
    return body


def leader_pod(
    name: str,
    *,
    ip: str,
    deployment: str = "tiny-moe",
    role: str = "decode",
    namespace: str = "ns",
    ready: bool = True,
    terminating: bool = False,
    lws_group: str | None = None,
) -> dict[str, Any]:
    """A running group leader as the API lists it: Ready or not (still loading), or being deleted."""
    labels = {LABEL_DEPLOYMENT: deployment, LABEL_ROLE: role, LABEL_LEADER: "true"}
    if lws_group is not None:
        labels[LWS_GROUP_INDEX] = lws_group
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    return {
        "metadata": meta,
        "status": {"phase": "Running", "podIP": ip, "conditions": [condition]},
    }


class ClusterKube(MemoryKube):
    def __init__(self) -> None:
        super().__init__()
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.conflicts = 0
        self.rereads = 0
        self._uids = itertools.count(1)
        self._rv = itertools.count(100)

    def add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(body))
        meta = stored["metadata"]
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta["resourceVersion"] = str(next(self._rv))
        self.deployments[(meta["namespace"], meta["name"])] = stored
        return copy.deepcopy(stored)

    def touch(self, namespace: str, name: str) -> None:
        """Someone else wrote the object (the reconciler's status): a new resourceVersion."""
        self.deployments[(namespace, name)]["metadata"]["resourceVersion"] = str(next(self._rv))

    def remove(self, namespace: str, name: str) -> None:
        del self.deployments[(namespace, name)]

    async def list_deployments(self, *, namespace: str | None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(b) for (ns, _), b in sorted(self.deployments.items()) if namespace in (None, ns)
        ]

    async def get_deployment(self, *, name: str, namespace: str) -> dict[str, Any] | None:
        self.rereads += 1
        found = self.deployments.get((namespace, name))
        return None if found is None else copy.deepcopy(found)

    async def apply_status(
        self,
        *,
        name: str,
        namespace: str,
        status: dict[str, Any],
        field_manager: str,
        resource_version: str | None = None,
    ) -> bool:
        body = self.deployments.get((namespace, name))
        if body is not None:
            if resource_version is not None and resource_version != body["metadata"]["resourceVersion"]:
                self.conflicts += 1
                return False
            body["status"] = applied(body.get("status") or {}, status)
            body["metadata"]["resourceVersion"] = str(next(self._rv))
        return await super().apply_status(
            name=name,
            namespace=namespace,
            status=status,
            field_manager=field_manager,
            resource_version=resource_version,
        )

    async def list_pods(self, *, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(p)
            for p in self.pods
            if p["metadata"]["namespace"] == namespace
            and all(p["metadata"]["labels"].get(k) == v for k, v in labels.items())
        ]
