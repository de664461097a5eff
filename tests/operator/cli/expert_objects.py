"""Fixed objects for `kubectl moe experts`: the tiny example with decode over two expert-parallel ranks
(8 experts, 2 redundant slots: 5 slots per rank), and the ConfigMap the rebalance loop writes for it
(docs/expert-load.md's contract), with loads whose numbers the tests work out by hand."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from kubemoe_operator.render.experts import placement_key
from tests.operator.helpers import REPO

RANKS, SLOTS_PER_RANK = 2, 5
LAYERS = [0, 1]
# The default placement (each rank its block of 4, then a copy of its own first expert) ...
PREVIOUS = [[0, 1, 2, 3, 0, 4, 5, 6, 7, 4], [0, 1, 2, 3, 0, 4, 5, 6, 7, 4]]
# ... and the one the last rebalance chose: expert 5 in three slots (two on rank 0), expert 6 in three.
SLOTS = [[1, 2, 4, 5, 5, 0, 3, 5, 6, 7], [0, 1, 2, 3, 6, 4, 5, 6, 6, 7]]
TOKENS = [[100, 10, 10, 10, 10, 400, 10, 50], [5, 80, 5, 5, 30, 5, 200, 5]]
# Later traffic: layer 1's expert 1 grew hot (it has a single copy, on rank 0).
OBSERVED_TOKENS = [[90, 10, 10, 10, 10, 420, 10, 40], [5, 300, 5, 5, 30, 5, 200, 5]]


def busiest_over_mean(tokens: list[int], slots: list[int], ranks: int = RANKS) -> float:
    """Worked out here, not with plan/experts.py: each copy carries tokens / copies."""
    copies = {e: slots.count(e) for e in set(slots)}
    per_rank = len(slots) // ranks
    loads = [
        sum(tokens[e] / copies[e] for e in slots[r * per_rank : (r + 1) * per_rank]) for r in range(ranks)
    ]
    return max(loads) / (sum(loads) / ranks)


def deployment(
    *, experts: dict[str, Any] | None = None, decode: dict[str, Any] | None = None
) -> dict[str, Any]:
    """examples/tiny-moe.yaml as the API server returns it, with spec.experts and a status."""
    md: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    md["metadata"].update(namespace="prod", uid="u-1", generation=2)
    md["spec"]["experts"] = (
        {"redundant": 2, "rebalance": {"intervalSeconds": 300}} if experts is None else experts
    )
    if not md["spec"]["experts"]:
        del md["spec"]["experts"]
    if decode is not None:
        md["spec"]["roles"]["decode"]["parallelism"] = decode
    md["status"] = {
        "phase": "Ready",
        "experts": {
            "decode": {
                "generation": 1,
                "imbalance": 1.5,
                "predictedImbalance": 1.02,
                "lastRebalanceTime": "2026-11-29T06:00:00Z",
                "message": "generation 1 applied on every decode group",
            }
        },
    }
    return md


def _placement_key() -> str:
    source = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())["spec"]["model"]["source"]
    return placement_key(ranks=RANKS, slots_per_rank=SLOTS_PER_RANK, source=source)


PLACEMENT_KEY = _placement_key()
"""The key the rebalancer writes the decode groups' placement under (render/experts.placement_key)."""


def placement(slots: list[list[int]] = SLOTS, generation: int = 1) -> dict[str, Any]:
    return {
        "generation": generation,
        "ranks": RANKS,
        "slotsPerRank": SLOTS_PER_RANK,
        "layers": [{"layer": layer, "slots": s} for layer, s in zip(LAYERS, slots, strict=True)],
    }


def rebalance(tokens: list[list[int]] = TOKENS) -> dict[str, Any]:
    return {
        "generation": 1,
        "time": "2026-11-29T06:00:00Z",
        "windowSeconds": 300,
        "layers": LAYERS,
        "tokens": tokens,
        "previousSlots": PREVIOUS,
        "slots": SLOTS,
        "imbalanceBefore": [busiest_over_mean(t, s) for t, s in zip(tokens, PREVIOUS, strict=True)],
        "imbalancePredicted": [busiest_over_mean(t, s) for t, s in zip(tokens, SLOTS, strict=True)],
    }


def observed(tokens: list[list[int]] = OBSERVED_TOKENS, *, with_imbalance: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "time": "2026-11-29T06:05:00Z",
        "generation": 1,
        "layers": LAYERS,
        "tokens": tokens,
    }
    if with_imbalance:
        doc["imbalance"] = [busiest_over_mean(t, s) for t, s in zip(tokens, SLOTS, strict=True)]
    return doc


def config_map(**docs: dict[str, Any] | str | None) -> dict[str, Any]:
    """The decode role's ConfigMap; keys placement, rebalance, observed (a str is stored as is)."""
    defaults: dict[str, Any] = {"placement": placement(), "rebalance": rebalance(), "observed": observed()}
    defaults.update(docs)
    data = {
        (PLACEMENT_KEY if key == "placement" else f"{key}.json"): value
        if isinstance(value, str)
        else json.dumps(value)
        for key, value in defaults.items()
        if value is not None
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tiny-moe-decode-experts", "namespace": "prod"},
        "data": copy.deepcopy(data),
    }
