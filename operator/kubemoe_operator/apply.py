"""Apply the rendered children and prune the ones the plan no longer has.

Each rendered object carries the sha256 of its own content in an annotation. A child whose
annotation matches is left alone, so a resync with nothing to change sends no write at all;
anything else (new, changed, deleted by someone, hash edited) is server-side applied with the
operator's single field manager, forcing conflicts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubemoe_operator.kinds import ChildKey, key_of
from kubemoe_operator.kube import Kube, Observed, owned_by
from kubemoe_operator.render.names import ANNOTATION_HASH, LABEL_DEPLOYMENT


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


def select_prunable(
    *, observed: Iterable[Mapping[str, Any]], desired: Iterable[Mapping[str, Any]], owner: str, uid: str
) -> list[ChildKey]:
    """Children labelled for `owner` and owned by `uid` that the desired set no longer has."""
    wanted = {key_of(dict(obj)) for obj in desired}
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
    current: dict[ChildKey, dict[str, Any]] = field(default_factory=dict)
    """Every desired child as the cluster now holds it (apply responses, or what was observed)."""


async def sync_children(
    *, kube: Kube, desired: list[dict[str, Any]], observed: Observed, owner: str, uid: str, namespace: str
) -> SyncResult:
    """Apply what changed, in order; then prune what is no longer desired."""
    result = SyncResult()
    stamped_objs = [stamped(obj) for obj in desired]
    for obj in stamped_objs:
        key = key_of(obj)
        seen = observed.children.get(key)
        if needs_apply(obj, seen):
            result.current[key] = await kube.apply(obj)
            result.applied.append(key)
        elif seen is not None:
            result.current[key] = seen
    for kind, name in select_prunable(
        observed=observed.children.values(), desired=stamped_objs, owner=owner, uid=uid
    ):
        await kube.delete(kind=kind, name=name, namespace=namespace)
        result.pruned.append((kind, name))
    return result
