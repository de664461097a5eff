"""A group leader's `GET /v1/experts/load`, read as untrusted input, and the role's load summed over
its groups (docs/expert-load.md has the document)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_TOKENS = 1 << 62
MAX_ERROR = 512
"""placement.error is cut to this many characters (it goes into status and an Event)."""


class LoadError(ValueError):
    """A load document that cannot be used; the message names the field."""


@dataclass(frozen=True)
class GroupLoad:
    """What one group leader reports: its window of logical-expert load and its current placement."""

    window_seconds: float
    layers: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]
    """Per layer, tokens routed to each logical expert over the window."""
    slots: tuple[tuple[int, ...], ...]
    """Per layer, the logical expert of each physical slot (rank r holds slots [r*S, (r+1)*S))."""
    ranks: int
    slots_per_rank: int
    generation: int
    pending_generation: int | None
    error: str | None = None
    """Why the last generation the group gave up was not applied (placement.error), or None; it stays
    until a later generation is applied, whatever the group was sent since."""

    @property
    def n_experts(self) -> int:
        return len(self.tokens[0])

    @property
    def redundant(self) -> int:
        return self.ranks * self.slots_per_rank - self.n_experts


def _int(value: Any, field: str, *, lo: int = 0, hi: int = MAX_TOKENS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LoadError(f"{field} must be an integer in {lo}..{hi}, not {value!r:.40}")
    return value


def _list(value: Any, field: str, *, most: int) -> list[Any]:
    if not isinstance(value, list) or not value or len(value) > most:
        raise LoadError(f"{field} must be a list of 1..{most} entries")
    return value


def parse_group_load(doc: Any) -> GroupLoad:
    """Check and read one leader's document; LoadError naming the field on anything else."""
    if not isinstance(doc, Mapping):
        raise LoadError("the document must be a JSON object")
    placement = doc.get("placement")
    if not isinstance(placement, Mapping):
        raise LoadError("placement must be an object")
    ranks = _int(placement.get("ranks"), "placement.ranks", lo=1, hi=MAX_EXPERTS)
    per_rank = _int(placement.get("slots_per_rank"), "placement.slots_per_rank", lo=1, hi=MAX_EXPERTS)
    generation = _int(placement.get("generation"), "placement.generation")
    pending = placement.get("pending_generation")
    pending = None if pending is None else _int(pending, "placement.pending_generation")
    error = placement.get("error")
    if error is not None and not isinstance(error, str):
        raise LoadError(f"placement.error must be a string or null, not {error!r:.40}")
    if error is not None:  # one line, bounded; "" is no error
        error = " ".join(error.split())[:MAX_ERROR] or None
    window = doc.get("window_seconds")
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, float))
        or not math.isfinite(window)
        or window < 0
    ):
        raise LoadError(f"window_seconds must be a non-negative number, not {window!r:.40}")
    layers, tokens, slots = [], [], []
    for i, entry in enumerate(_list(doc.get("layers"), "layers", most=MAX_LAYERS)):
        if not isinstance(entry, Mapping):
            raise LoadError(f"layers[{i}] must be an object")
        layers.append(_int(entry.get("layer"), f"layers[{i}].layer", hi=1 << 20))
        counts = _list(entry.get("tokens"), f"layers[{i}].tokens", most=MAX_EXPERTS)
        tokens.append(tuple(_int(v, f"layers[{i}].tokens[{e}]") for e, v in enumerate(counts)))
        held = _list(entry.get("slots"), f"layers[{i}].slots", most=MAX_EXPERTS * 2)
        n = len(counts)
        row = tuple(_int(v, f"layers[{i}].slots[{p}]", hi=n - 1) for p, v in enumerate(held))
        if len(row) != ranks * per_rank:
            raise LoadError(f"layers[{i}].slots has {len(row)} entries, not ranks x slots_per_rank")
        if len(set(row)) != n:
            raise LoadError(f"layers[{i}].slots leaves an expert without a slot")
        slots.append(row)
    if len(set(layers)) != len(layers):
        raise LoadError("layers repeats a layer")
    if len({len(t) for t in tokens}) != 1:
        raise LoadError("layers differ in their number of experts")
    return GroupLoad(
        window_seconds=float(window),
        layers=tuple(layers),
        tokens=tuple(tokens),
        slots=tuple(slots),
        ranks=ranks,
        slots_per_rank=per_rank,
        generation=generation,
        pending_generation=pending,
        error=error,
    )


def summed(groups: Sequence[GroupLoad]) -> tuple[tuple[int, ...], ...]:
    """The role's tokens per layer and expert: every group's window added (they share one placement).
    LoadError when the groups do not describe the same model and layout."""
    first = groups[0]
    for g in groups[1:]:
        if (g.layers, g.ranks, g.slots_per_rank, g.n_experts) != (
            first.layers,
            first.ranks,
            first.slots_per_rank,
            first.n_experts,
        ):
            raise LoadError("the role's groups report different layers or layouts (a rollout in progress?)")
    return tuple(
        tuple(map(sum, zip(*(g.tokens[i] for g in groups), strict=True))) for i in range(len(first.layers))
    )
