"""The role's experts ConfigMap as the rebalancer writes it: each layout's placement (what a pod of that
layout that starts later loads), the load each check saw (observed.json) and the last rebalance
(rebalance.json), which `kubectl moe experts` shows."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubemoe_operator.render.experts import PLACEMENT_FILE, PLACEMENT_KEY_PREFIX
from kubemoe_operator.render.names import Owner, experts_configmap_name

REBALANCE_KEY, OBSERVED_KEY = "rebalance.json", "observed.json"


def configmap(
    owner: Owner,
    role: str,
    data: Mapping[str, Any],
    *,
    keep: Mapping[str, Any] | None,
    key: str,
    width: int,
) -> dict[str, Any]:
    """The ConfigMap to apply: `data` (the placement under `key`: the layout every group runs, `width`
    slots a layer; loop.py) and the other keys of `keep` (the ConfigMap as it is), but for other layouts'
    placements and a rebalance record of another layout (`kubectl moe experts` would read it against
    this layout's placement)."""
    old = dict((keep or {}).get("data") or {})
    kept = {  # other layouts' placements go: every group runs this one (loop.py)
        name: value
        for name, value in old.items()
        if not name.startswith(PLACEMENT_KEY_PREFIX) and name != PLACEMENT_FILE
    }
    layout_changed = any(
        (name.startswith(PLACEMENT_KEY_PREFIX) or name == PLACEMENT_FILE) and name != key for name in old
    )
    if REBALANCE_KEY in kept and not record_fits(
        kept[REBALANCE_KEY], key, width=width, layout_changed=layout_changed
    ):
        del kept[REBALANCE_KEY]
    for name, value in data.items():
        kept[name] = json.dumps(value, separators=(",", ":"))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": experts_configmap_name(owner.name, role),
            "namespace": owner.namespace,
            # no deployment label: the reconciler prunes the labelled children it did not render
            "labels": {
                "app.kubernetes.io/part-of": "kubemoe",
                "app.kubernetes.io/component": "experts",
            },
            "ownerReferences": [owner.reference()],
        },
        "data": kept,
    }


def placement_of(cm: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
    """The ConfigMap's placement for one layout (render/experts.placement_key), or None when there is
    none or it does not parse (rewritten then)."""
    raw = ((cm or {}).get("data") or {}).get(key)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if (
        not isinstance(doc, dict)
        or isinstance(doc.get("generation"), bool)
        or not isinstance(doc.get("generation"), int)
    ):
        return None
    return doc


def record_of(cm: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ConfigMap's rebalance.json, or None when there is none or it does not parse."""
    raw = ((cm or {}).get("data") or {}).get(REBALANCE_KEY)
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def record_fits(raw: Any, key: str, *, width: int, layout_changed: bool) -> bool:
    """Whether a kept rebalance.json is of the layout placed under `key` (`width` slots a layer): it
    names its key (placementKey); one written before records named it is kept when its slots are
    `width` long, unless the layout is changing now."""
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        return False
    if not isinstance(doc, dict):
        return False
    if "placementKey" in doc:
        return bool(doc["placementKey"] == key)
    rows = [row for name in ("slots", "previousSlots") for row in (doc.get(name) or [])]
    return not layout_changed and all(isinstance(row, list) and len(row) == width for row in rows)
