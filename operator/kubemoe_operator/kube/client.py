"""The only module that talks to the Kubernetes API for a reconcile (lightkube's async client).

Every write goes through `Kube` and is logged as `write: VERB KIND NAMESPACE/NAME` and counted,
so tests can see that a no-op resync writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.resources.core_v1 import Event as CoreEvent
from lightkube.resources.core_v1 import Secret
from lightkube.types import CascadeType, PatchType

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT
from kubemoe_operator.api.resource import API_VERSION, KIND
from kubemoe_operator.kube.events import CreateEvent, EventCorrelator, PatchEvent
from kubemoe_operator.kube.kinds import BY_KIND, CHILD_KINDS, POD, ChildKey, ModelDeploymentResource, key_of

log = logging.getLogger("kubemoe.kube")

_CREATABLE: dict[str, Any] = {"Secret": Secret}

RETRYABLE_CODES = frozenset({409, 429, 500, 502, 503, 504})

REPLICAS_HANDOVER_MANAGER = "kubemoe-replicas-handover"
"""The field manager that holds a workload's spec.replicas between the operator letting go of it and
an external scaler (HPA, KEDA) taking it through the scale subresource (`Kube.hand_over_replicas`)."""


class RetryableError(Exception):
    """The API failed in a way a retry can fix (conflict, throttling, server or network error)."""


class RejectedError(Exception):
    """The API refused an object for good (invalid, forbidden): retrying the same request cannot help."""


class NameTakenError(RejectedError):
    """A child's name belongs to an object this ModelDeployment does not own: never adopted."""


def classify(err: Exception, *, what: str) -> Exception:
    """Wrap an API or transport error into RetryableError or RejectedError."""
    if isinstance(err, ApiError):
        code = err.status.code or 0
        message = f"{what}: {code} {err.status.reason or ''}: {err.status.message or ''}".strip()
        return RetryableError(message) if code in RETRYABLE_CODES else RejectedError(message)
    if isinstance(err, httpx2.HTTPStatusError):
        code = err.response.status_code
        message = f"{what}: {code} {err.response.text[:200]}"
        return RetryableError(message) if code in RETRYABLE_CODES else RejectedError(message)
    return RetryableError(f"{what}: {type(err).__name__}: {err}")


@dataclass
class Observed:
    """What exists in the cluster for one ModelDeployment."""

    children: dict[ChildKey, dict[str, Any]] = field(default_factory=dict)
    """Children carrying the deployment label and an owner reference to it."""
    pods: list[dict[str, Any]] = field(default_factory=list)
    lws_served: bool = True
    """False when the API does not serve LeaderWorkerSets (the CRD is not installed)."""
    pod_monitors_served: bool = True
    """False when the API does not serve PodMonitors (no Prometheus operator's CRDs)."""


@dataclass
class _Call:
    tolerated: int | None = None
    """The status code of an ApiError the caller said to tolerate, when one was raised."""


@contextlib.contextmanager
def _api(what: str, *, tolerate: Collection[int] = ()) -> Iterator[_Call]:
    """Run one API call: an ApiError whose code is in `tolerate` is recorded on the yielded _Call and
    swallowed; any other API or transport error becomes RetryableError or RejectedError (`classify`)."""
    call = _Call()
    try:
        yield call
    except ApiError as err:
        if err.status.code not in tolerate:
            raise classify(err, what=what) from err
        call.tolerated = err.status.code
    except httpx2.HTTPError as err:
        raise classify(err, what=what) from err


def _status_code(err: Exception) -> int | None:
    if isinstance(err, ApiError):
        return err.status.code
    if isinstance(err, httpx2.HTTPStatusError):
        return err.response.status_code
    return None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def owns_replicas(obj: Mapping[str, Any], manager: str) -> bool:
    """Whether `manager`'s server-side apply owns the object's spec.replicas (its managedFields)."""
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply" or entry.get("subresource"):
            continue
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    out: dict[str, Any] = obj.to_dict()
    return out


class Kube:
    """Reads and writes for the reconciler, with one server-side-apply field manager."""

    def __init__(self, client: AsyncClient, *, field_manager: str) -> None:
        self.client = client
        self.field_manager = field_manager
        self.writes: Counter[str] = Counter()
        self.created: set[tuple[str, str, str, str]] = set()
        self.event_correlator = EventCorrelator()

    def _wrote(self, verb: str, kind: str, namespace: str, name: str) -> None:
        self.writes[verb] += 1
        log.info("write: %s %s %s/%s", verb, kind, namespace, name)

    async def get_deployment(self, *, name: str, namespace: str) -> dict[str, Any] | None:
        with _api(f"get ModelDeployment {namespace}/{name}", tolerate={404}) as call:
            obj = await self.client.get(ModelDeploymentResource, name, namespace=namespace)
        return None if call.tolerated else _as_dict(obj)

    async def list_deployments(self, *, namespace: str | None) -> list[dict[str, Any]]:
        """Every ModelDeployment in `namespace` (None: all namespaces)."""
        with _api("list ModelDeployments"):
            found = self.client.list(ModelDeploymentResource, namespace=namespace or ALL_NS)
            items = [_as_dict(o) async for o in found]
        return items

    async def observe(self, *, name: str, namespace: str, uid: str) -> Observed:
        """List each child kind (and the pods) by the deployment label; keep those `uid` owns."""
        seen = Observed()
        labels: dict[str, Any] = {LABEL_DEPLOYMENT: name}
        for kind in (*CHILD_KINDS, POD):
            try:
                items = [
                    _as_dict(o)
                    async for o in self.client.list(kind.resource, namespace=namespace, labels=labels)
                ]
            except httpx2.HTTPError as err:  # ApiError too; an unserved resource is a plain-text 404
                if kind.kind == "LeaderWorkerSet" and _status_code(err) == 404:
                    seen.lws_served = False
                    continue
                if kind.kind == "PodMonitor" and _status_code(err) == 404:
                    seen.pod_monitors_served = False
                    continue
                raise classify(err, what=f"list {kind.kind} in {namespace}") from err
            for obj in items:
                obj.setdefault("apiVersion", kind.api_version)
                obj.setdefault("kind", kind.kind)
                if kind is POD:
                    seen.pods.append(obj)
                elif owned_by(obj, uid):
                    seen.children[key_of(obj)] = obj
        return seen

    async def get_child(self, *, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """One object of a child kind by name, whoever owns it; None when there is none."""
        with _api(f"get {kind} {namespace}/{name}", tolerate={404}) as call:
            obj = await self.client.get(BY_KIND[kind].resource, name, namespace=namespace)
        return None if call.tolerated else _as_dict(obj)

    async def create_once(self, obj: dict[str, Any]) -> None:
        """Create `obj` unless it exists (409 is fine), once per object and owner in this process:
        for objects the operator makes but never reads back (the KV key Secret)."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"], meta["ownerReferences"][0]["uid"])
        if key in self.created:
            return
        with _api(f"create {obj['kind']} {meta['namespace']}/{meta['name']}", tolerate={409}) as call:
            await self.client.create(_CREATABLE[obj["kind"]].from_dict(obj))
        if not call.tolerated:
            self._wrote("create", obj["kind"], meta["namespace"], meta["name"])
        self.created.add(key)

    def forget_created(self, *, kind: str, namespace: str, name: str) -> None:
        """The next create_once of this object creates it again (it was seen missing)."""
        self.created = {k for k in self.created if k[:3] != (kind, namespace, name)}

    async def apply(
        self, obj: dict[str, Any], *, field_manager: str | None = None, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply with this operator's field manager (or `field_manager`), taking over
        conflicting fields unless `force` is False (a conflict is then a RetryableError: 409)."""
        kind, name = key_of(obj)
        namespace = obj["metadata"]["namespace"]
        manager = field_manager or self.field_manager
        with _api(f"apply {kind} {namespace}/{name} as {manager}"):
            out = await self.client.patch(
                BY_KIND[kind].resource,
                name,
                obj,
                namespace=namespace,
                patch_type=PatchType.APPLY,
                field_manager=manager,
                force=force,
            )
        self._wrote("apply" if manager == self.field_manager else f"apply:{manager}", kind, namespace, name)
        applied = _as_dict(out)
        applied.setdefault("apiVersion", obj["apiVersion"])
        applied.setdefault("kind", kind)
        return applied

    async def hand_over_replicas(self, live: Mapping[str, Any]) -> None:
        """Make REPLICAS_HANDOVER_MANAGER co-own spec.replicas at its live value, so that the
        operator's next apply, which leaves the field out, lets go of it without the API server
        removing it (sole owner gone: reset to 1). The documented transfer of a field to an HPA
        (Kubernetes' server-side apply: transferring ownership). Not forced: if a scaler changed
        the value since `live` was read, the 409 retries the reconcile on a fresh read instead of
        writing the stale count back."""
        meta = live["metadata"]
        body = {
            "apiVersion": live["apiVersion"],
            "kind": live["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": live["spec"]["replicas"]},
        }
        await self.apply(body, field_manager=REPLICAS_HANDOVER_MANAGER, force=False)

    async def delete(self, *, kind: str, name: str, namespace: str) -> None:
        with _api(f"delete {kind} {namespace}/{name}", tolerate={404}) as call:
            await self.client.delete(
                BY_KIND[kind].resource, name, namespace=namespace, cascade=CascadeType.BACKGROUND
            )
        if not call.tolerated:
            self._wrote("delete", kind, namespace, name)

    async def pod_creation_events(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's FailedCreate Events and, when there are any, its SuccessfulCreate ones
        (reconcile/observe.creation_failures reads them). Not worth failing a reconcile for: an error
        (RBAC without `list events`, say) is logged and reads as none."""
        out: list[dict[str, Any]] = []
        for reason in ("FailedCreate", "SuccessfulCreate"):
            try:
                out += [
                    _as_dict(e)
                    async for e in self.client.list(CoreEvent, namespace=namespace, fields={"reason": reason})
                ]
            except httpx2.HTTPError as err:  # ApiError too
                log.warning("could not list %s Events in %s: %s", reason, namespace, err)
                return out
            if not out:
                return out
        return out

    async def post_event(self, event: dict[str, Any]) -> None:
        """Post an Event, aggregated as client-go does (kube/events.py): the same one again within ten
        minutes, or the tenth of similar ones, PATCHes the count of the Event this process created
        instead of creating another. Losing one is not worth failing a reconcile for: errors are logged."""
        action = self.event_correlator.observe(event)
        try:
            if isinstance(action, PatchEvent):
                if await self._patch_event(namespace=action.namespace, name=action.name, patch=action.patch):
                    self.event_correlator.patched(action)
                    self._wrote("patch", "Event", action.namespace, action.name)
                    return
                self.event_correlator.forget(action.key)  # expired or deleted: post it anew
                action = self.event_correlator.observe(event)
                assert isinstance(action, CreateEvent)
            namespace = action.body["metadata"]["namespace"]
            name = await self._create_event(action.body)
        except (ApiError, httpx2.HTTPError, RetryableError, RejectedError) as err:
            log.warning("could not post event %s: %s", event.get("reason"), err)
            return
        self.event_correlator.created(action.key, namespace=namespace, name=name)
        self._wrote("create", "Event", namespace, event["involvedObject"]["name"])

    async def _create_event(self, body: dict[str, Any]) -> str:
        """POST an Event; the name the API server gave it."""
        created = await self.client.create(cast(CoreEvent, CoreEvent.from_dict(body)))
        return str(created.metadata.name if created.metadata else "")

    async def _patch_event(self, *, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch an Event; False when it is gone (404)."""
        with _api(f"patch Event {namespace}/{name}", tolerate={404}) as call:
            await self.client.patch(CoreEvent, name, patch, namespace=namespace, patch_type=PatchType.MERGE)
        return not call.tolerated

    async def apply_status(
        self,
        *,
        name: str,
        namespace: str,
        status: dict[str, Any],
        field_manager: str,
        resource_version: str | None = None,
    ) -> bool:
        """Server-side apply of status as `field_manager` (the reconciler's or the autoscaler's):
        the fields in `status` are set, and those this manager owned and `status` leaves out are
        removed unless another manager owns them too. No read-modify-write: see status.py.

        With `resource_version`, the apply lands only on the object as read at that version.
        False when it did not land: the object is gone, or changed since `resource_version`."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "status": status}
        what = f"apply status of ModelDeployment {namespace}/{name}"
        gone_or_changed = {404, 409} if resource_version is not None else {404}
        with _api(what, tolerate=gone_or_changed) as call:
            await self.client.patch(
                ModelDeploymentResource.Status,
                name,
                body,
                namespace=namespace,
                patch_type=PatchType.APPLY,
                field_manager=field_manager,
                force=True,
            )
        if call.tolerated:
            return False
        self._wrote("apply-status", "ModelDeployment", namespace, name)
        return True

    async def list_pods(self, *, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Pods in `namespace` with all of `labels`."""
        selector: dict[str, Any] = dict(labels)
        with _api(f"list pods in {namespace}"):
            found = self.client.list(POD.resource, namespace=namespace, labels=selector)
            pods = [_as_dict(o) async for o in found]
        return pods

    async def annotate_pod(self, *, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Merge `annotations` into a pod's (a JSON merge patch: nothing else of the pod changes)."""
        with _api(f"annotate pod {namespace}/{name}"):
            await self.client.patch(
                POD.resource,
                name,
                {"metadata": {"annotations": dict(annotations)}},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        self._wrote("patch", "Pod", namespace, name)


def event_body(
    *, involved: Mapping[str, Any], reason: str, message: str, warning: bool, component: str, now: str
) -> dict[str, Any]:
    """A core/v1 Event about `involved`, as `kubectl describe` shows it."""
    meta = involved["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
