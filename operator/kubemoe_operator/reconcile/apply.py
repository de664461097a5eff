"""Apply the rendered children and prune the ones the plan no longer has.

Each rendered object carries the sha256 of its own content in an annotation. A child whose
annotation matches, and whose live fields still hold every value the render sets (`drift`), is
left alone, so a resync with nothing to change sends no write at all; anything else (new, changed,
deleted by someone, hash edited, `kubectl scale` or `edit` on a field the operator sets) is
server-side applied with the operator's single field manager, forcing conflicts. A child's name
held by an object this ModelDeployment does not own is never taken over (`refuse_taken_names`).

A workload whose replicas an external scaler owns (autoscaling.mode external) renders without
spec.replicas. Server-side apply deletes a field whose only owner stops naming it, so the operator
hands it over first (`hand_over`): created with its initial count, or switched from operator mode
with the count it runs, the workload's replicas are co-owned by a second field manager before the
operator's apply lets go of them; an HPA's or `kubectl scale`'s update through /scale then takes
them over. The operator never names the field again, so neither its applies nor its drift check
touch the count.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubemoe_operator.api.labels import ANNOTATION_HASH, LABEL_DEPLOYMENT
from kubemoe_operator.api.quantity import milli_units
from kubemoe_operator.kube.client import (
    Kube,
    NameTakenError,
    Observed,
    RejectedError,
    owned_by,
    owns_replicas,
)
from kubemoe_operator.kube.kinds import ChildKey, key_of


def content_hash(obj: Mapping[str, Any]) -> str:
    """sha256 of the object's canonical JSON, without the hash annotation itself."""
    body = copy.deepcopy(dict(obj))
    meta = body.get("metadata", {})
    annotations = meta.get("annotations", {})
    annotations.pop(ANNOTATION_HASH, None)
    if not annotations:
        meta.pop("annotations", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def stamped(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `obj` carrying its content hash."""
    out = copy.deepcopy(dict(obj))
    out["metadata"].setdefault("annotations", {})[ANNOTATION_HASH] = content_hash(obj)
    return out


def needs_apply(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    """Whether `desired` (stamped) differs from what the cluster holds."""
    if observed is None or observed.get("metadata", {}).get("deletionTimestamp"):
        return True
    have = (observed.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_HASH)
    return bool(have != desired["metadata"]["annotations"][ANNOTATION_HASH])


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, int | float | str) and isinstance(have, int | float | str):
        try:  # the API server writes quantities in canonical form: 0.5 -> 500m, 1 -> "1"
            return _number(want) == _number(have)
        except ValueError:
            return False
    return False


def _number(value: int | float | str) -> int:
    return milli_units(repr(value) if isinstance(value, float) else value)


def drift(want: Any, have: Any, path: str = "") -> str | None:
    """The first place where `have` (a live object) no longer holds a value `want` (the render) sets:
    'spec.replicas: 3, rendered 2'; None when every rendered value is there. Fields the render does
    not set (server defaults, other managers' additions) are not compared; an empty or zero value
    matches a missing field (the API server omits those); owner references are the API's to keep."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return None if not want else f"{path or '(root)'}: {have!r:.80}, rendered an object"
        for key, value in want.items():
            if path == "metadata" and key == "ownerReferences":
                continue
            sub = f"{path}.{key}" if path else key
            if key not in have:
                if value in (None, False, 0, "", [], {}):
                    continue
                return f"{sub}: missing, rendered {value!r:.80}"
            found = drift(value, have[key], sub)
            if found is not None:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return f"{path}: {have!r:.80}, rendered {want!r:.80}"
        for i, (w, h) in enumerate(zip(want, have, strict=True)):
            found = drift(w, h, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if _same_scalar(want, have) else f"{path}: {have!r:.80}, rendered {want!r:.80}"


def select_prunable(
    *,
    observed: Iterable[Mapping[str, Any]],
    desired: Iterable[Mapping[str, Any]],
    owner: str,
    uid: str,
    keep: Collection[ChildKey] = (),
) -> list[ChildKey]:
    """Children labelled for `owner` and owned by `uid` that the desired set no longer has (and that
    are not in `keep`)."""
    wanted = {key_of(dict(obj)) for obj in desired} | set(keep)
    out: list[ChildKey] = []
    for obj in observed:
        labels = obj.get("metadata", {}).get("labels") or {}
        if labels.get(LABEL_DEPLOYMENT) != owner or not owned_by(obj, uid):
            continue
        if obj.get("metadata", {}).get("deletionTimestamp"):
            continue
        key = key_of(dict(obj))
        if key not in wanted:
            out.append(key)
    return sorted(out)


@dataclass
class SyncResult:
    applied: list[ChildKey] = field(default_factory=list)
    pruned: list[ChildKey] = field(default_factory=list)
    restored: dict[ChildKey, str] = field(default_factory=dict)
    """Children someone changed under the operator, put back: what had drifted, per child."""
    current: dict[ChildKey, dict[str, Any]] = field(default_factory=dict)
    """Every desired child as the cluster now holds it (apply responses, or what was observed)."""
    rejected: list[str] = field(default_factory=list)
    """Changes to existing children the API server refused ('Kind/name: why'); the others went on."""


def _holder(obj: Mapping[str, Any]) -> str:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    owner = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    return f"owned by {owner.get('kind')} {owner.get('name')}" if owner else "created by someone else"


async def refuse_taken_names(
    *, kube: Kube, desired: Iterable[Mapping[str, Any]], observed: Observed, uid: str, namespace: str
) -> None:
    """NameTakenError naming every child whose name another object holds (another ModelDeployment's
    child, or a user's own object). Checked before anything is applied: server-side apply with force
    would take such an object over, and two deployments would rewrite it in turn on every resync."""
    taken = []
    for obj in desired:
        kind, name = key_of(dict(obj))
        if (kind, name) in observed.children:
            continue  # ours already
        live = await kube.get_child(kind=kind, name=name, namespace=namespace)
        if live is not None and not owned_by(live, uid):
            taken.append(f"{kind} {namespace}/{name} ({_holder(live)})")
    if taken:
        raise NameTakenError(
            f"names taken: {'; '.join(taken)}. Nothing was applied. Fix: rename this ModelDeployment, "
            "or delete or rename those objects."
        )


def with_replicas(obj: Mapping[str, Any], replicas: int) -> dict[str, Any]:
    """`obj` (a workload rendered without spec.replicas) with `replicas` set."""
    out = copy.deepcopy(dict(obj))
    out["spec"] = {"replicas": replicas, **out["spec"]}
    return out


async def hand_over(
    *, kube: Kube, obj: dict[str, Any], seen: dict[str, Any] | None, initial: int
) -> tuple[dict[str, Any], bool]:
    """Before the operator's apply of `obj`, a workload an external scaler owns: create it if missing
    (with `initial` replicas), and if the operator's field manager owns spec.replicas (just created,
    or switched from mode operator), have the hand-over manager co-own the live count. Returns the
    workload as it now is and whether the operator must apply `obj` (to let go of the field)."""
    if seen is None:
        seen = await kube.apply(with_replicas(obj, initial))
    if not owns_replicas(seen, kube.field_manager):
        return seen, False
    await kube.hand_over_replicas(seen)
    return seen, True


async def sync_children(
    *,
    kube: Kube,
    desired: list[dict[str, Any]],
    observed: Observed,
    owner: str,
    uid: str,
    namespace: str,
    create_first: Sequence[dict[str, Any]] = (),
    initial_replicas: Mapping[ChildKey, int] | None = None,
    keep: Collection[ChildKey] = (),
) -> SyncResult:
    """Refuse taken names; create `create_first` if missing (objects made once and never read back,
    such as the KV key Secret the pods read); apply what changed, in order; prune what is no longer
    desired. Nothing is written when a name is taken. `initial_replicas`: the workloads an external
    scaler owns (rendered without spec.replicas), with the count to create each with (`hand_over`).
    A refused change to a child that exists is recorded in `rejected` and the rest goes on; a refused
    create raises RejectedError (the children after it may depend on it).
    `keep`: children left as they are, neither applied nor pruned (workloads held for model.cache)."""
    initial_replicas = initial_replicas or {}
    result = SyncResult()
    stamped_objs = [stamped(obj) for obj in desired]
    await refuse_taken_names(kube=kube, desired=stamped_objs, observed=observed, uid=uid, namespace=namespace)
    for obj in create_first:
        await kube.create_once(obj)
    for obj in stamped_objs:
        key = key_of(obj)
        seen = observed.children.get(key)
        letting_go = False
        if key in initial_replicas:
            seen, letting_go = await hand_over(kube=kube, obj=obj, seen=seen, initial=initial_replicas[key])
        drifted = None if seen is None or needs_apply(obj, seen) else drift(obj, seen)
        if drifted is not None:
            result.restored[key] = drifted
        if needs_apply(obj, seen) or drifted is not None or letting_go:
            try:
                result.current[key] = await kube.apply(obj)
            except RejectedError as err:
                if seen is None or isinstance(err, NameTakenError):
                    raise  # a child not there yet: what follows it may need it (policies before pods)
                # a change the API refuses (an immutable field of a bound claim, say): the child
                # stays as it is, and the others (the workloads, the autoscaler's replicas) go on
                result.rejected.append(f"{key[0]}/{key[1]}: {err}")
                result.restored.pop(key, None)  # not put back after all
                result.current[key] = seen
                continue
            result.applied.append(key)
        elif seen is not None:
            result.current[key] = seen
    for key in keep:
        if key in observed.children:
            result.current[key] = observed.children[key]
    for kind, name in select_prunable(
        observed=observed.children.values(), desired=stamped_objs, owner=owner, uid=uid, keep=keep
    ):
        await kube.delete(kind=kind, name=name, namespace=namespace)
        result.pruned.append((kind, name))
    return result
