"""Expert placement: which logical expert each physical expert slot of an expert-parallel group holds.

Pure and deterministic (no torch, no clock, no randomness): the same loads give the same placement.

The model. One MoE layer has E logical experts and R expert-parallel ranks. Each rank holds
S = E/R + redundant/R physical slots: its own share plus an equal share of the group's `redundant`
extra slots (so `redundant` is a multiple of R, and E a multiple of R, as the planner already
requires). Every logical expert sits in at least one slot; a hot expert may sit in several, and
its tokens are then split evenly among its copies. A rank's load is the sum of its slots' shares;
the layer's imbalance is the busiest rank's load over the mean rank load (1.0 is perfect; the
slowest rank sets an EP group's pace, so this is the figure to bring down).

Physical slot p lives on rank p // S; a placement is the tuple of logical expert ids by physical
slot (rank 0's S slots first), each rank's slots in ascending expert order.

The algorithm follows the published idea of DeepSeek's EPLB (its non-hierarchical form), written
anew here:

1. Replicate: each redundant slot goes to the expert with the heaviest load per copy (ties: the
   lower expert id). Done twice: with at most R copies of an expert (more than one per rank
   cannot spread it further) and without a limit (with S slots per rank a second copy on one
   rank can still help, by filling a slot that would otherwise take load elsewhere).
2. Pack: the physical copies, heaviest first (ties: lower expert id), each onto the least-loaded
   rank that has a free slot (ties: the lower rank), preferring a rank that holds no copy of that
   expert yet: longest-processing-time-first with a cardinality limit of S per rank.
3. Refine (ours, not EPLB's): swap two copies between the busiest rank and another while that
   lowers the busier of the two below the current maximum. Each swap makes the sorted rank loads
   strictly smaller, so it ends; it is also capped.
4. Keep the best: the two results of 1-3 are compared with today's contiguous placement
   (`identity_slots`, its redundant slots filled with copies of the rank's own experts, which
   move no load) refined the same way, and the lowest busiest-rank load is kept (the first of
   equals), so a rebalance never predicts worse than the identity.

Left out: EPLB's hierarchical variant (experts grouped to nodes first, to keep an expert group's
traffic inside a node): it needs the node count and the model's expert groups (DeepSeek-V3's
n_group), which the placement does not yet get; the global form above balances over all ranks at once
and only ignores which node each rank is on.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_REFINE_SWAPS = 4096
"""Most improving swaps per layer (each pass is S x S x R comparisons; it converges far sooner)."""

_REL_TOL = 1e-12
"""A swap must lower the maximum by more than this fraction of the mean (float noise is no gain)."""


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's placement and what it predicts."""

    slots: tuple[int, ...]
    """Logical expert id of each physical slot; rank r holds slots[r * S:(r + 1) * S]."""
    ranks: int
    rank_loads: tuple[float, ...]
    """Predicted load (tokens) of each rank."""

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots) // self.ranks

    @property
    def imbalance(self) -> float:
        """Busiest rank's load over the mean rank load (1.0 when there is no load at all)."""
        return _imbalance(self.rank_loads)

    def rank_experts(self, rank: int) -> tuple[int, ...]:
        """The logical experts rank `rank` holds, one per slot."""
        s = self.slots_per_rank
        return self.slots[rank * s : (rank + 1) * s]


def _imbalance(rank_loads: Sequence[float]) -> float:
    total = math.fsum(rank_loads)
    if total <= 0:
        return 1.0
    return max(rank_loads) * len(rank_loads) / total  # not max / (total / n): a tiny total underflows


def _check_shape(*, n_experts: int, ranks: int, redundant: int) -> int:
    """Slots per rank, or ValueError for a shape the placement cannot take."""
    for name, value in (("experts", n_experts), ("ranks", ranks), ("redundant", redundant)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if n_experts < 1:
        raise ValueError(f"there must be at least one expert, not {n_experts}")
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    if n_experts % ranks:
        raise ValueError(f"{n_experts} experts do not divide evenly over {ranks} ranks")
    if redundant < 0:
        raise ValueError(f"redundant must not be negative, not {redundant}")
    if redundant % ranks:
        raise ValueError(
            f"redundant={redundant} is not a multiple of the {ranks} ranks (each rank gets an equal share)"
        )
    if redundant > n_experts * (ranks - 1):
        raise ValueError(
            f"redundant={redundant} exceeds {n_experts * (ranks - 1)}, a copy of every expert on every rank"
        )
    return (n_experts + redundant) // ranks


def _check_load(load: Sequence[float]) -> tuple[float, ...]:
    values: list[float] = []
    for i, value in enumerate(load):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"load of expert {i} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"load of expert {i} is {value}: loads must be finite")
        if value < 0:
            raise ValueError(f"load of expert {i} is negative ({value})")
        values.append(float(value))
    return tuple(values)


def identity_slots(n_experts: int, ranks: int) -> tuple[int, ...]:
    """Today's placement: rank r holds the contiguous block r*E/R .. (r+1)*E/R - 1, no redundant slots
    (the torch engine's `expert_range`, and vLLM's default)."""
    _check_shape(n_experts=n_experts, ranks=ranks, redundant=0)
    return tuple(range(n_experts))


def default_slots(n_experts: int, ranks: int, redundant: int = 0) -> tuple[int, ...]:
    """The placement a group starts with before any rebalance (the torch engine's own default): rank r
    holds its contiguous block of E/R experts, then redundant/R slots with copies of its own first
    experts (a copy on the same rank moves no load). With redundant = 0, `identity_slots`."""
    _check_shape(n_experts=n_experts, ranks=ranks, redundant=redundant)
    block, extra = n_experts // ranks, redundant // ranks
    return tuple(
        e
        for r in range(ranks)
        for e in (*range(r * block, (r + 1) * block), *(r * block + k % block for k in range(extra)))
    )


def rank_loads(load: Sequence[float], slots: Sequence[int], *, ranks: int) -> tuple[float, ...]:
    """Each rank's load under `slots`, a replicated expert's load split evenly among its copies."""
    values = _check_load(load)
    n = len(values)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, not {ranks!r}")
    if len(slots) % ranks:
        raise ValueError(f"{len(slots)} slots do not divide evenly over {ranks} ranks")
    copies = [0] * n
    for expert in slots:
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < n:
            raise ValueError(f"slot holds {expert!r}, not an expert id in 0..{n - 1}")
        copies[expert] += 1
    missing = [e for e in range(n) if copies[e] == 0]
    if missing:
        raise ValueError(f"experts {missing[:8]} have no slot: every expert must be placed at least once")
    s = len(slots) // ranks
    return tuple(math.fsum(values[e] / copies[e] for e in slots[r * s : (r + 1) * s]) for r in range(ranks))


def imbalance(load: Sequence[float], slots: Sequence[int], *, ranks: int) -> float:
    """Busiest rank's load over the mean rank load under `slots` (1.0 when there is no load)."""
    return _imbalance(rank_loads(load, slots, ranks=ranks))


def _replicate(load: tuple[float, ...], *, redundant: int, cap: int) -> list[int]:
    """Copies of each expert: one each, then each redundant slot to the heaviest load per copy among
    the experts with fewer than `cap` copies."""
    copies = [1] * len(load)
    heap = [(-w, e) for e, w in enumerate(load) if cap > 1]
    heapq.heapify(heap)
    for _ in range(redundant):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < cap:
            heapq.heappush(heap, (-load[e] / copies[e], e))
    return copies


def _pack(items: list[tuple[int, float]], *, ranks: int, per_rank: int) -> list[list[tuple[int, float]]]:
    """Heaviest item first onto the least-loaded rank with a free slot, preferring one without that expert."""
    bins: list[list[tuple[int, float]]] = [[] for _ in range(ranks)]
    totals = [0.0] * ranks
    for expert, share in sorted(items, key=lambda item: (-item[1], item[0])):
        open_ranks = [r for r in range(ranks) if len(bins[r]) < per_rank]
        fresh = [r for r in open_ranks if all(e != expert for e, _ in bins[r])]
        best = min(fresh or open_ranks, key=lambda r: (totals[r], r))
        bins[best].append((expert, share))
        totals[best] += share
    return bins


def _refine(bins: list[list[tuple[int, float]]], *, tol: float) -> None:
    """Swap copies between the busiest rank and another while that lowers the busier of the two."""
    totals = [math.fsum(w for _, w in b) for b in bins]
    for _ in range(MAX_REFINE_SWAPS):
        top = max(range(len(bins)), key=lambda r: (totals[r], -r))
        peak = totals[top]
        best: tuple[float, int, int, int] | None = None
        for other in range(len(bins)):
            if other == top:
                continue
            held_top = {e for e, _ in bins[top]}
            held_other = {e for e, _ in bins[other]}
            for i, (ei, wi) in enumerate(bins[top]):
                for j, (ej, wj) in enumerate(bins[other]):
                    delta = wi - wj
                    if delta <= 0 or ei == ej or ei in held_other or ej in held_top:
                        continue
                    worse = max(peak - delta, totals[other] + delta)
                    if worse < peak - tol and (best is None or worse < best[0]):
                        best = (worse, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        (ei, wi), (ej, wj) = bins[top][i], bins[other][j]
        bins[top][i], bins[other][j] = (ej, wj), (ei, wi)
        totals[top] += wj - wi
        totals[other] += wi - wj


def _as_placement(bins: list[list[tuple[int, float]]], load: tuple[float, ...]) -> LayerPlacement:
    slots = tuple(e for b in bins for e in sorted(e for e, _ in b))
    ranks = len(bins)
    return LayerPlacement(slots=slots, ranks=ranks, rank_loads=rank_loads(load, slots, ranks=ranks))


def balance_layer(load: Sequence[float], *, ranks: int, redundant: int = 0) -> LayerPlacement:
    """The placement of one layer's experts (E = len(load)) over `ranks` ranks with `redundant` extra slots.

    ValueError for a negative, NaN or infinite load, E not a multiple of `ranks`, or `redundant`
    negative, not a multiple of `ranks`, or above E x (ranks - 1).
    """
    values = _check_load(load)
    per_rank = _check_shape(n_experts=len(values), ranks=ranks, redundant=redundant)
    tol = _REL_TOL * (math.fsum(values) / ranks)

    candidates: list[LayerPlacement] = []
    for cap in dict.fromkeys((ranks, len(values) + redundant)):  # R copies at most; then no limit
        copies = _replicate(values, redundant=redundant, cap=cap)
        items = [(e, values[e] / c) for e, c in enumerate(copies) for _ in range(c)]
        greedy = _pack(items, ranks=ranks, per_rank=per_rank)
        _refine(greedy, tol=tol)
        candidates.append(_as_placement(greedy, values))

    # The guard: today's blocks, each rank's redundant slots holding copies of its own heaviest experts
    # (a copy on the same rank moves no load), refined with those copies' shares.
    block = len(values) // ranks
    extra = redundant // ranks
    fill: list[list[int]] = []
    for r in range(ranks):
        own = sorted(range(r * block, (r + 1) * block), key=lambda e: (-values[e], e))
        fill.append(own + [own[k % block] for k in range(extra)])
    counts = [0] * len(values)
    for experts in fill:
        for e in experts:
            counts[e] += 1
    guard = [[(e, values[e] / counts[e]) for e in experts] for experts in fill]
    _refine(guard, tol=tol)
    candidates.append(_as_placement(guard, values))
    return min(candidates, key=lambda c: max(c.rank_loads))  # min keeps the first of equals


def balance(loads: Sequence[Sequence[float]], *, ranks: int, redundant: int = 0) -> list[LayerPlacement]:
    """`balance_layer` for each layer; every layer must have the same number of experts."""
    if not loads:
        raise ValueError("no layers to place")
    sizes = {len(layer) for layer in loads}
    if len(sizes) != 1:
        raise ValueError(f"layers differ in their number of experts: {sorted(sizes)}")
    return [balance_layer(layer, ranks=ranks, redundant=redundant) for layer in loads]
