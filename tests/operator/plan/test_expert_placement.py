"""The expert placement (plan/experts.py): shape, the optimum on small cases, the 1.15 goal, refusals."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemoe_operator.plan.experts import (
    LayerPlacement,
    balance,
    balance_layer,
    default_slots,
    identity_slots,
    imbalance,
    rank_loads,
)

BRUTE_FORCE_FACTOR = 4 / 3
"""The greedy's busiest rank is within this factor of the optimum's on every small case below (the
classic bound of longest-processing-time-first; measured worst over 600 random cases: 1.135)."""


def zipf(n_experts: int, *, s: float = 1.0, seed: int = 0) -> list[float]:
    """Zipf-skewed tokens per expert (rank k gets 1/k^s of the top), hot experts at shuffled ids."""
    ids = list(range(n_experts))
    random.Random(seed).shuffle(ids)
    load = [0.0] * n_experts
    for k, e in enumerate(ids):
        load[e] = 10_000.0 / (k + 1) ** s
    return load


def check_shape(p: LayerPlacement, *, n_experts: int, ranks: int, redundant: int) -> None:
    per_rank = (n_experts + redundant) // ranks
    assert p.ranks == ranks
    assert len(p.slots) == n_experts + redundant
    assert p.slots_per_rank == per_rank
    assert all(len(p.rank_experts(r)) == per_rank for r in range(ranks))
    assert set(p.slots) == set(range(n_experts))


# --- the optimum, by enumeration -------------------------------------------------------------


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _best_split(items: list[float], *, ranks: int, per_rank: int) -> float:
    """The lowest busiest-rank load over every way to deal `items` to ranks, per_rank each."""
    best = math.inf

    def deal(left: list[float], peak: float, rank: int) -> None:
        nonlocal best
        if rank == ranks - 1:
            best = min(best, max(peak, math.fsum(left)))
            return
        for picked in itertools.combinations(range(1, len(left)), per_rank - 1):
            chosen = [left[0], *(left[i] for i in picked)]
            rest = [x for i, x in enumerate(left) if i and i not in picked]
            deal(rest, max(peak, math.fsum(chosen)), rank + 1)

    deal(items, 0.0, 0)
    return best


def optimum(load: list[float], *, ranks: int, redundant: int) -> float:
    """The lowest busiest-rank load of any placement: every count of copies (each expert at least one,
    no limit), every dealing of the copies to ranks."""
    per_rank = (len(load) + redundant) // ranks
    return min(
        _best_split(
            [load[e] / c for e, c in enumerate(copies) for _ in range(c)], ranks=ranks, per_rank=per_rank
        )
        for copies in _compositions(len(load) + redundant, len(load))
    )


SMALL_SHAPES = [  # (experts, ranks, redundant): E <= 6, R = 2 or 3, up to one redundant slot per rank
    (e, r, red) for r in (2, 3) for e in (2, 3, 4, 6) if e % r == 0 for red in (0, r) if red <= e * (r - 1)
]


def _small_loads(seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    out: list[list[float]] = [[0, 7, 0], [4, 13, 4], [8, 0, 9, 4], [20, 10, 18, 1], [0, 10, 19, 12, 9, 0]]
    for _ in range(40):
        e = rng.choice([2, 3, 4, 6])
        out.append([rng.choice([0, 1, 2, 3, 5, 8, 13, 100]) * rng.random() for _ in range(e)])
        out.append([float(rng.randint(0, 20)) for _ in range(e)])
    return out


@pytest.mark.parametrize(("n_experts", "ranks", "redundant"), SMALL_SHAPES)
def test_within_the_stated_factor_of_the_brute_force_optimum(
    n_experts: int, ranks: int, redundant: int
) -> None:
    cases = 0
    for load in _small_loads(seed=n_experts * 10 + ranks + redundant):
        if len(load) != n_experts:
            continue
        cases += 1
        p = balance_layer(load, ranks=ranks, redundant=redundant)
        best = optimum(load, ranks=ranks, redundant=redundant)
        got = max(p.rank_loads)
        assert got >= best - 1e-9 * max(1.0, best)  # the enumeration is exhaustive
        assert got <= BRUTE_FORCE_FACTOR * best + 1e-9, (load, got, best)
        # provably optimal: at most two slots per rank and no replication is "heaviest with lightest"
        if redundant == 0 and n_experts // ranks <= 2:
            assert got == pytest.approx(best, rel=1e-12, abs=1e-12), (load, got, best)
    assert cases >= 5


def test_provably_optimal_cases() -> None:
    # one rank: everything on it; one slot per rank: the only placement (up to the ranks' order)
    load = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    assert max(balance_layer(load, ranks=1).rank_loads) == pytest.approx(sum(load))
    assert max(balance_layer(load, ranks=6).rank_loads) == 9.0
    assert max(balance_layer([1.0, 2.0, 3.0, 4.0], ranks=2).rank_loads) == 5.0  # {4,1} {3,2}


# --- shape, determinism, never worse than today ------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([(4, 2), (6, 3), (8, 4), (8, 2), (16, 4), (12, 6), (9, 3), (5, 1)]).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.integers(0, shape[0] * (shape[1] - 1) // shape[1]).map(lambda k: k * shape[1]),
            st.lists(
                st.one_of(st.floats(0, 1e6, allow_nan=False, allow_infinity=False), st.integers(0, 10**6)),
                min_size=shape[0],
                max_size=shape[0],
            ),
        )
    )
)
def test_properties(case: tuple[tuple[int, int], int, list[float]]) -> None:
    (n_experts, ranks), redundant, load = case
    p = balance_layer(load, ranks=ranks, redundant=redundant)
    check_shape(p, n_experts=n_experts, ranks=ranks, redundant=redundant)
    # the prediction is what the placement gives, and it conserves the load
    assert p.rank_loads == rank_loads(load, p.slots, ranks=ranks)
    assert math.fsum(p.rank_loads) == pytest.approx(math.fsum(load), rel=1e-9, abs=1e-6)
    # never worse than the contiguous blocks the engine uses today
    today = imbalance(load, identity_slots(n_experts, ranks), ranks=ranks)
    assert p.imbalance <= today * (1 + 1e-12)
    # deterministic, and a rank's slots in ascending expert order
    assert balance_layer(list(load), ranks=ranks, redundant=redundant) == p
    assert all(list(p.rank_experts(r)) == sorted(p.rank_experts(r)) for r in range(ranks))


def test_identity_is_todays_contiguous_blocks() -> None:
    slots = identity_slots(8, 4)
    p = LayerPlacement(slots=slots, ranks=4, rank_loads=rank_loads([1.0] * 8, slots, ranks=4))
    assert [p.rank_experts(r) for r in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert imbalance([4, 4, 0, 0, 1, 1, 1, 1], slots, ranks=4) == pytest.approx(8 / 3)


def test_replicated_load_is_split_evenly() -> None:
    # expert 0 in two slots on two ranks: 6 tokens each; expert 3's two copies share rank 1
    assert rank_loads([12, 1, 1, 1], [0, 1, 2, 0, 3, 3], ranks=2) == (8.0, 7.0)
    # three copies of expert 0, two on rank 0: 4 tokens each
    assert rank_loads([12, 1, 1, 1], [0, 1, 0, 2, 3, 0], ranks=2) == (9.0, 6.0)


def test_hot_experts_are_replicated_and_spread() -> None:
    load = [100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    p = balance_layer(load, ranks=4, redundant=4)
    counts = Counter(p.slots)
    assert counts[0] >= 4  # the hot expert takes the redundant slots
    assert all(0 in p.rank_experts(r) for r in range(4))  # on every rank
    assert p.imbalance < 1.1
    assert imbalance(load, identity_slots(8, 4), ranks=4) > 3.5


def test_deterministic_tie_breaking() -> None:
    p = balance_layer([1.0] * 8, ranks=4, redundant=4)
    assert p.slots == balance_layer([1.0] * 8, ranks=4, redundant=4).slots
    # equal loads: the lowest ids take the redundant slots, the lowest ranks the heaviest copies
    assert sorted(Counter(p.slots).items()) == [(e, 2 if e < 4 else 1) for e in range(8)]
    assert p.imbalance == pytest.approx(1.0)
    assert balance_layer([0.0] * 4, ranks=2).imbalance == 1.0  # no load: nothing to balance


def test_zipf_at_e64_r8_redundant8_meets_the_goal() -> None:
    for s in (0.8, 1.0, 1.2):
        for seed in range(3):
            load = zipf(64, s=s, seed=seed)
            p = balance_layer(load, ranks=8, redundant=8)
            check_shape(p, n_experts=64, ranks=8, redundant=8)
            today = imbalance(load, identity_slots(64, 8), ranks=8)
            assert p.imbalance <= 1.15, (s, seed, p.imbalance)
            assert today > 1.5  # the skew is real
    # sampled token counts rather than exact weights: still within the goal
    rng = random.Random(7)
    weights = zipf(64, s=1.0, seed=3)
    counts = Counter(rng.choices(range(64), weights=weights, k=200_000))
    assert balance_layer([counts[e] for e in range(64)], ranks=8, redundant=8).imbalance <= 1.15


def test_many_layers() -> None:
    loads = [zipf(16, seed=layer) for layer in range(5)]
    placements = balance(loads, ranks=4, redundant=4)
    assert [p.slots for p in placements] == [balance_layer(x, ranks=4, redundant=4).slots for x in loads]
    with pytest.raises(ValueError, match="differ in their number of experts"):
        balance([[1.0] * 4, [1.0] * 8], ranks=2)
    with pytest.raises(ValueError, match="no layers"):
        balance([], ranks=2)


# --- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "ranks", "redundant", "match"),
    [
        ([1.0, -1.0], 2, 0, "negative"),
        ([1.0, math.nan], 2, 0, "finite"),
        ([1.0, math.inf], 2, 0, "finite"),
        ([1.0, "3"], 2, 0, "must be a number"),
        ([1.0, True], 2, 0, "must be a number"),
        ([1.0, 2.0, 3.0], 2, 0, "do not divide evenly"),
        ([], 1, 0, "at least one expert"),
        ([1.0, 2.0], 0, 0, "ranks must be at least 1"),
        ([1.0, 2.0], -2, 0, "ranks must be at least 1"),
        ([1.0, 2.0], 2.0, 0, "ranks must be an integer"),
        ([1.0, 2.0], 2, 1, "not a multiple of the 2 ranks"),
        ([1.0, 2.0], 2, -2, "must not be negative"),
        ([1.0, 2.0], 2, 4, "exceeds 2"),
    ],
)
def test_hostile_input_refused(load: list[object], ranks: object, redundant: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        balance_layer(load, ranks=ranks, redundant=redundant)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("slots", "match"),
    [
        ([0, 1, 2], "do not divide evenly"),
        ([0, 0, 1, 1], "have no slot"),
        ([0, 1, 2, 4], "not an expert id"),
        ([0, 1, 2, -1], "not an expert id"),
    ],
)
def test_bad_placement_refused(slots: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rank_loads([1.0, 1.0, 1.0, 1.0], slots, ranks=2)


def test_a_vanishingly_small_load_still_has_an_imbalance() -> None:
    """A total load of one denormal: max / (total / ranks) would divide by an underflowed zero."""
    p = balance_layer([5e-324, 0.0, 0.0, 0.0], ranks=2, redundant=0)
    assert p.imbalance == pytest.approx(2.0)


def test_default_slots_are_each_ranks_block_then_copies_of_its_own_first_experts() -> None:
    assert default_slots(8, 2) == identity_slots(8, 2)
    assert default_slots(8, 2, 4) == (0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5)
    # a copy on its own rank moves no load: the default predicts what the contiguous blocks do
    load = [9, 1, 1, 1, 1, 1, 1, 1]
    assert imbalance(load, default_slots(8, 2, 4), ranks=2) == imbalance(load, identity_slots(8, 2), ranks=2)
    with pytest.raises(ValueError, match="multiple"):
        default_slots(8, 2, 3)
