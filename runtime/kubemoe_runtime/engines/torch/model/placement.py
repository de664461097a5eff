"""Expert placement: which logical expert each physical expert slot of an expert-parallel group holds.

One MoE layer has E logical experts and R ranks; rank r holds `rank_sizes[r]` physical slots, S each
when they are equal (S = (E + N) / R with N redundant slots, the only shape a placement document may
have). Physical slot p lives on rank p // S; a layer's placement is the list of the R*S logical expert
ids by physical slot, rank 0's slots first. Every expert sits in at least one slot; a replicated
expert's (token, choice) pairs are split evenly among its copies (moe.py `SlotRoute`), so a rank's load
is the sum over its slots of each expert's load over its copy count (`rank_loads`).

The default (no file, nothing posted; the operator's plan/experts.py `default_slots` is the same
function): rank r holds its contiguous block of b = E/R experts, then N/R slots with copies of its own
first experts, [r*b + k % b for k in range(N // R)]. With N = 0 it is the engine's original layout
(`expert_range`, which also takes an E that R does not divide).

The document (a file at start, the body of POST /v1/experts/placement; docs/expert-load.md):

    {"generation": 3, "ranks": 4, "slotsPerRank": 5, "layers": [{"layer": 1, "slots": [...R*S ids]}, ...]}

It is untrusted: `parse_placement` checks every field and names the first bad one (`PlacementError.field`).
Pure: no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubemoe_runtime.engines.torch.load.rank_weights import expert_range

MAX_GENERATION = 2**63 - 1  # the operator keeps it in an int64


class PlacementError(ValueError):
    """A placement that cannot be used; `field` names the first bad field of the document."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Placement:
    """Every MoE layer's slots. `slots[i]` belongs to MoE layer `layers[i]`: the logical expert of each
    physical slot, rank 0's `rank_sizes[0]` slots first."""

    generation: int
    n_experts: int
    rank_sizes: tuple[int, ...]
    layers: tuple[int, ...]
    slots: tuple[tuple[int, ...], ...]

    @property
    def ranks(self) -> int:
        return len(self.rank_sizes)

    @property
    def redundant(self) -> int:
        return sum(self.rank_sizes) - self.n_experts

    @property
    def slots_per_rank(self) -> int | list[int]:
        """S, or one count per rank where they differ (N = 0 with R not dividing E)."""
        sizes = set(self.rank_sizes)
        return sizes.pop() if len(sizes) == 1 else list(self.rank_sizes)

    def first_slot(self, rank: int) -> int:
        return sum(self.rank_sizes[:rank])

    def rank_slots(self, i: int, rank: int) -> tuple[int, ...]:
        """The logical experts rank `rank` holds in MoE layer number i (by layer index: `layers[i]`)."""
        first = self.first_slot(rank)
        return self.slots[i][first : first + self.rank_sizes[rank]]

    def copies(self, i: int) -> list[int]:
        """How many slots hold each logical expert in MoE layer number i."""
        counts = [0] * self.n_experts
        for expert in self.slots[i]:
            counts[expert] += 1
        return counts

    def rank_loads(self, i: int, tokens: Sequence[float]) -> list[float]:
        """Each rank's tokens in MoE layer number i, a replicated expert's tokens split among its copies."""
        copies = self.copies(i)
        loads = []
        for rank in range(self.ranks):
            loads.append(math.fsum(tokens[e] / copies[e] for e in self.rank_slots(i, rank)))
        return loads

    def document(self) -> dict[str, Any]:
        """The placement document (docs/expert-load.md); needs equal slot counts per rank."""
        return {
            "generation": self.generation,
            "ranks": self.ranks,
            "slotsPerRank": self.slots_per_rank,
            "layers": [
                {"layer": layer, "slots": list(s)} for layer, s in zip(self.layers, self.slots, strict=True)
            ],
        }


def check_redundant(*, n_experts: int, ranks: int, redundant: int) -> None:
    """ValueError, naming --redundant-experts, for a count of redundant slots this group cannot take."""
    if redundant < 0:
        raise ValueError(f"--redundant-experts must not be negative, not {redundant}")
    if redundant == 0:
        return
    if n_experts % ranks:
        raise ValueError(
            f"--redundant-experts needs the {n_experts} experts to divide evenly over the {ranks} ranks"
        )
    if redundant % ranks:
        raise ValueError(
            f"--redundant-experts {redundant} is not a multiple of the {ranks} expert-parallel ranks "
            "(each rank gets an equal share)"
        )
    if redundant > n_experts * (ranks - 1):
        raise ValueError(
            f"--redundant-experts {redundant} exceeds {n_experts * (ranks - 1)}, a copy of every expert on "
            f"every rank (with {ranks} rank{'s' if ranks > 1 else ''})"
        )


def default_placement(
    *, n_experts: int, ranks: int, layers: Sequence[int], redundant: int = 0, generation: int = 0
) -> Placement:
    """The placement a group starts with (module docstring); ValueError for a bad `redundant`."""
    check_redundant(n_experts=n_experts, ranks=ranks, redundant=redundant)
    if redundant == 0:
        blocks = [expert_range(n_experts=n_experts, ep_rank=r, ep_size=ranks) for r in range(ranks)]
        sizes = tuple(len(b) for b in blocks)
        slots = tuple(e for block in blocks for e in block)
    else:
        b, extra = n_experts // ranks, redundant // ranks
        sizes = (b + extra,) * ranks
        slots = tuple(
            e
            for r in range(ranks)
            for e in (*range(r * b, (r + 1) * b), *(r * b + k % b for k in range(extra)))
        )
    return Placement(
        generation=generation,
        n_experts=n_experts,
        rank_sizes=sizes,
        layers=tuple(layers),
        slots=(slots,) * len(layers),
    )


def _integer(value: object, field: str) -> int:
    if type(value) is not int:  # bool is an int subclass; 3.0 is not an expert id
        shown = "null (or missing)" if value is None else repr(value)[:40]
        raise PlacementError(field, f"must be an integer, not {shown}")
    return value


def parse_placement(
    doc: object, *, n_experts: int, ranks: int, layers: Sequence[int], redundant: int
) -> Placement:
    """A checked placement from an untrusted document, for a group of `ranks` ranks with `redundant`
    extra slots over `n_experts` experts and MoE layers `layers`; PlacementError names the first bad field."""
    if (n_experts + redundant) % ranks:
        raise PlacementError(
            "ranks",
            f"this group's {n_experts} experts + {redundant} redundant slots do not divide evenly over its "
            f"{ranks} ranks, so it takes no placement (only the default)",
        )
    per_rank = (n_experts + redundant) // ranks
    if not isinstance(doc, dict):
        raise PlacementError("(document)", f"must be a JSON object, not {type(doc).__name__}")
    generation = _integer(doc.get("generation"), "generation")
    if not 0 <= generation <= MAX_GENERATION:
        raise PlacementError("generation", f"must be in 0..{MAX_GENERATION}, not {generation}")
    if _integer(doc.get("ranks"), "ranks") != ranks:
        raise PlacementError("ranks", f"is {doc['ranks']} but this group has {ranks} expert-parallel ranks")
    if _integer(doc.get("slotsPerRank"), "slotsPerRank") != per_rank:
        raise PlacementError(
            "slotsPerRank",
            f"is {doc['slotsPerRank']} but each rank of this group has {per_rank} slots "
            f"({n_experts} experts + {redundant} redundant over {ranks} ranks; --redundant-experts sets it)",
        )
    entries = doc.get("layers")
    if not isinstance(entries, list):
        raise PlacementError("layers", "must be a list with one entry per MoE layer")
    moe = set(layers)
    total = ranks * per_rank
    by_layer: dict[int, tuple[int, ...]] = {}
    for n, entry in enumerate(entries):
        where = f"layers[{n}]"
        if not isinstance(entry, dict):
            raise PlacementError(where, 'must be an object {"layer": L, "slots": [...]}')
        layer = _integer(entry.get("layer"), f"{where}.layer")
        if layer not in moe:
            raise PlacementError(
                f"{where}.layer",
                f"{layer} is not a MoE layer of this model (its MoE layers: {_span(layers)})",
            )
        if layer in by_layer:
            raise PlacementError(f"{where}.layer", f"layer {layer} is listed twice")
        slots = entry.get("slots")
        if not isinstance(slots, list):
            raise PlacementError(f"{where}.slots", f"must be a list of {total} expert ids")
        if len(slots) != total:
            raise PlacementError(
                f"{where}.slots", f"has {len(slots)} entries, not ranks x slotsPerRank = {total}"
            )
        for s, expert in enumerate(slots):
            if not 0 <= _integer(expert, f"{where}.slots[{s}]") < n_experts:
                raise PlacementError(
                    f"{where}.slots[{s}]", f"{expert} is not an expert id in 0..{n_experts - 1}"
                )
        missing = sorted(set(range(n_experts)) - set(slots))
        if missing:
            raise PlacementError(
                f"{where}.slots",
                f"experts {missing[:8]} have no slot: every expert must be placed at least once",
            )
        by_layer[layer] = tuple(slots)
    absent = [layer for layer in layers if layer not in by_layer]
    if absent:
        raise PlacementError("layers", f"MoE layers {absent[:8]} are missing: list every MoE layer once")
    return Placement(
        generation=generation,
        n_experts=n_experts,
        rank_sizes=(per_rank,) * ranks,
        layers=tuple(layers),
        slots=tuple(by_layer[layer] for layer in layers),
    )


def _span(layers: Sequence[int]) -> str:
    shown = ", ".join(str(layer) for layer in layers[:8])
    return shown + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")


MAX_FILE_BYTES = 16 << 20


def read_placement_file(
    path: Path, *, n_experts: int, ranks: int, layers: Sequence[int], redundant: int
) -> Placement:
    """The placement in `path` (--expert-placement), or the default when there is no such file (the
    operator's ConfigMap is optional: a group starts before its first rebalance). PlacementError, its
    message naming the file and the field, for a file that is there but not a valid placement."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return default_placement(n_experts=n_experts, ranks=ranks, layers=layers, redundant=redundant)
    except OSError as err:
        raise PlacementError("(file)", f"{path}: cannot read it ({err})") from err
    if size > MAX_FILE_BYTES:
        raise PlacementError(
            "(file)", f"{path}: {size} bytes, more than a placement can take ({MAX_FILE_BYTES})"
        )
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise PlacementError("(file)", f"{path}: not a JSON placement document ({err})") from err
    try:
        return parse_placement(doc, n_experts=n_experts, ranks=ranks, layers=layers, redundant=redundant)
    except PlacementError as err:
        raise PlacementError(err.field, f"{path}: {str(err).removeprefix(err.field + ': ')}") from err
