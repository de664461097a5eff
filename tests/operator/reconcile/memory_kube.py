"""An in-memory API server for reconcile()'s unit tests: a `Kube` whose objects live in a dict.

It keeps what the reconciler relies on from the real one, no more: objects by (kind, namespace, name);
server-side apply that sets the fields the render sends and keeps the rest (status, fields another
manager set); a uid and a resourceVersion on every object; create that refuses an existing name; a
status subresource; and who owns a workload's spec.replicas (managedFields, for that field only): an
apply that names it owns it (forced: alone, unless the value is the same; unforced: a 409 against
another owner's different value), an apply that leaves it out lets go, and the field goes back to
its default 1 when its last owner lets go; `scale` is an update through /scale. Listing by label and
owner is `Kube.observe`'s own job, so `observe` here filters the same way. The e2e suites run the
same reconciler against a real kube-apiserver; this double makes the reconciler's rules (apply what
changed, put drift back, refuse taken names, prune, hand replicas over) fast to test.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Mapping
from typing import Any, cast

from lightkube import AsyncClient

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT
from kubemoe_operator.kube.client import Kube, Observed, RetryableError, owned_by
from kubemoe_operator.kube.kinds import CHILD_KINDS, key_of

Key = tuple[str, str, str]
"""(kind, namespace, name)"""
CHILD_KIND_NAMES = frozenset(k.kind for k in CHILD_KINDS)
SCALABLE = frozenset({"Deployment", "LeaderWorkerSet"})


def applied(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply, simplified: the patch's fields win, maps merge, lists are replaced."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = applied(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class MemoryKube(Kube):
    def __init__(self, *, lws_served: bool = True, pod_monitors_served: bool = False) -> None:
        super().__init__(cast(AsyncClient, None), field_manager="kubemoe-operator")
        self.objects: dict[Key, dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.lws_served = lws_served
        self.pod_monitors_served = pod_monitors_served
        self._versions = itertools.count(1)
        self.replica_owners: dict[Key, dict[str, str]] = {}
        """(kind, namespace, name) -> manager -> operation (Apply, Update), for spec.replicas."""

    # --- what tests use to set the scene ----------------------------------------------------------

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` as someone else would (kubectl, a controller): a uid, a new resourceVersion."""
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(stored["kind"], meta["namespace"], meta["name"])] = stored
        return stored

    def scale(self, kind: str, namespace: str, name: str, replicas: int, *, manager: str = "kubectl") -> None:
        """`kubectl scale` or an HPA: an update through /scale, which takes spec.replicas over."""
        key = (kind, namespace, name)
        obj = copy.deepcopy(self.objects[key])
        obj["spec"]["replicas"] = replicas
        self.replica_owners[key] = {manager: "Update"}
        obj["metadata"]["managedFields"] = self._managed_fields(key)
        self.put(obj)

    def _replicas_after(self, key: Key, obj: Mapping[str, Any], *, manager: str, force: bool) -> int:
        """spec.replicas once `manager` applied `obj`, and who owns it then."""
        owners = self.replica_owners.setdefault(key, {})
        live = self.objects.get(key, {}).get("spec", {}).get("replicas")
        want = obj["spec"].get("replicas")
        if want is None:
            if owners.pop(manager, None) is not None and not owners:
                return 1  # its last owner let go: removed, then defaulted
            return 1 if live is None else int(live)
        if live is not None and want != live and set(owners) - {manager}:
            if not force:
                raise RetryableError(f"apply {key}: 409 Conflict: spec.replicas is owned by {sorted(owners)}")
            owners.clear()
        owners[manager] = "Apply"
        return int(want)

    def _managed_fields(self, key: Key) -> list[dict[str, Any]]:
        return [
            {
                "manager": m,
                "operation": op,
                "fieldsV1": {"f:spec": {"f:replicas": {}}},
                **({"subresource": "scale"} if op == "Update" else {}),
            }
            for m, op in sorted(self.replica_owners.get(key, {}).items())
        ]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[(kind, namespace, name)]

    def kinds(self, namespace: str) -> list[tuple[str, str]]:
        return sorted((k, n) for (k, ns, n) in self.objects if ns == namespace)

    # --- Kube ---------------------------------------------------------------------------------------

    async def observe(self, *, name: str, namespace: str, uid: str) -> Observed:
        seen = Observed(lws_served=self.lws_served, pod_monitors_served=self.pod_monitors_served)
        for (kind, ns, _), obj in self.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if ns != namespace or labels.get(LABEL_DEPLOYMENT) != name:
                continue
            if kind == "Pod":
                seen.pods.append(copy.deepcopy(obj))
            elif kind in CHILD_KIND_NAMES and owned_by(obj, uid):
                seen.children[key_of(obj)] = copy.deepcopy(obj)
        return seen

    async def pod_creation_events(self, namespace: str) -> list[dict[str, Any]]:
        """The controllers' Events a test put (kind Event), by reason as Kube lists them."""
        return [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in self.objects.items()
            if kind == "Event"
            and ns == namespace
            and obj.get("reason") in ("FailedCreate", "SuccessfulCreate")
        ]

    async def get_child(self, *, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def create_once(self, obj: dict[str, Any]) -> None:
        """As Kube's: created once per object and owner in this process, a 409 being fine."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"], meta["ownerReferences"][0]["uid"])
        if key in self.created:
            return
        if (obj["kind"], meta["namespace"], meta["name"]) not in self.objects:
            self.put(obj)
            self._wrote("create", obj["kind"], meta["namespace"], meta["name"])
        self.created.add(key)

    async def apply(
        self, obj: dict[str, Any], *, field_manager: str | None = None, force: bool = True
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        manager = field_manager or self.field_manager
        stored = applied(self.objects.get(key, {}), obj)
        if obj["kind"] in SCALABLE:
            stored["spec"]["replicas"] = self._replicas_after(key, obj, manager=manager, force=force)
            stored["metadata"]["managedFields"] = self._managed_fields(key)
        stored = self.put(stored)
        self._wrote("apply" if manager == self.field_manager else f"apply:{manager}", *key)
        return copy.deepcopy(stored)

    async def delete(self, *, kind: str, name: str, namespace: str) -> None:
        self.objects.pop((kind, namespace, name), None)
        self.replica_owners.pop((kind, namespace, name), None)
        self._wrote("delete", kind, namespace, name)

    # Events: Kube.post_event's own aggregation runs; only the two API calls are in memory.

    async def _create_event(self, body: dict[str, Any]) -> str:
        """As the API server: a name from generateName and a random suffix, a uid, a resourceVersion."""
        stored = copy.deepcopy(body)
        meta = stored["metadata"]
        meta["name"] = meta.pop("generateName", "") + uuid.uuid4().hex[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        self.events.append(stored)
        return str(meta["name"])

    async def _patch_event(self, *, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """A merge patch of the Event; False (the API's 404) when there is none of that name."""
        for event in self.events:
            if event["metadata"]["namespace"] == namespace and event["metadata"]["name"] == name:
                event.update(copy.deepcopy(patch))
                event["metadata"]["resourceVersion"] = str(next(self._versions))
                return True
        return False

    async def apply_status(
        self,
        *,
        name: str,
        namespace: str,
        status: dict[str, Any],
        field_manager: str,
        resource_version: str | None = None,
    ) -> bool:
        self.statuses[(namespace, name)] = applied(self.statuses.get((namespace, name), {}), status)
        self._wrote("status", "ModelDeployment", namespace, name)
        return True
