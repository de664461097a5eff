"""The pure parts of the expert-balance bench (bench/bench_expert_balance.py): the figures its table
prints, each on a case where a plausible mistake (a mean of per-layer ratios, a rate over the whole
phase, a load window that lost tokens) gives another number."""

from __future__ import annotations

import pytest
from bench_expert_balance import (
    Skew,
    decode_rate,
    layer_imbalances,
    overall_imbalance,
    shared_core_bound,
    window_diff,
    zipf_biases,
)

# Two ranks, four experts, one slot each: rank 0 holds experts 0 and 1, rank 1 experts 2 and 3.
SLOTS = [0, 1, 2, 3]


def test_overall_imbalance_is_the_sum_of_busiest_over_the_sum_of_means() -> None:
    # Layer 0: ranks 9 and 1 (ratio 1.8); layer 1: 10 and 10 (ratio 1.0), ten times the tokens.
    tokens = [[5, 4, 1, 0], [5, 5, 5, 5]]
    slots = [SLOTS, SLOTS]
    assert layer_imbalances(tokens, slots, ranks=2) == pytest.approx([1.8, 1.0])
    # (9 + 10) / (5 + 10), not the mean of the layers' ratios (1.4)
    assert overall_imbalance(tokens, slots, ranks=2) == pytest.approx(19 / 15)


def test_a_replicated_expert_splits_its_tokens_among_its_copies() -> None:
    # Expert 0 on both ranks: its 8 tokens count 4 on each, so the ranks carry 4 + 1 = 5 and 4 + 1 = 5.
    assert overall_imbalance([[8, 1, 1]], [[0, 1, 0, 2]], ranks=2) == pytest.approx(1.0)
    assert overall_imbalance([[8, 1, 1]], [[0, 1, 2, 2]], ranks=2) == pytest.approx(18 / 10)


def test_no_tokens_is_balanced() -> None:
    assert overall_imbalance([[0, 0, 0, 0]], [SLOTS], ranks=2) == 1.0


def test_shared_cores_bound_the_step_by_the_total_work_too() -> None:
    tokens = [[3, 3, 1, 1]]  # ranks 6 and 2: mean 4
    assert shared_core_bound(tokens, [SLOTS], ranks=2, cores=2) == pytest.approx(
        overall_imbalance(tokens, [SLOTS], ranks=2)
    )
    # One core runs both ranks' 8 tokens one after the other: 8 / 4, not the busiest rank's 6 / 4.
    assert shared_core_bound(tokens, [SLOTS], ranks=2, cores=1) == pytest.approx(2.0)


def test_decode_rate_counts_only_while_every_stream_decodes() -> None:
    # Stream a starts at 0 and ends at 10; b starts at 2 and ends at 4. Both decode from 2 to 4:
    # a's tokens at 3 and 4 and b's at 3 and 4 (b's first, at 2, is the window's start).
    a = [0.0, 1.0, 2.0, 3.0, 4.0, 10.0]
    b = [2.0, 3.0, 4.0]
    assert decode_rate([a, b]) == pytest.approx(4 / 2)


def test_decode_rate_refuses_streams_that_never_overlap() -> None:
    with pytest.raises(ValueError, match="no time"):
        decode_rate([[0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(ValueError, match="no tokens"):
        decode_rate([[0.0, 1.0], []])


def test_window_diff_is_the_phase_and_refuses_a_window_that_dropped_tokens() -> None:
    assert window_diff([[1, 2], [0, 0]], [[4, 2], [1, 5]]) == [[3, 0], [1, 5]]
    with pytest.raises(ValueError, match="lost tokens"):
        window_diff([[5, 2]], [[4, 9]])


def test_zipf_biases_favour_hot_experts_by_rank() -> None:
    skew = Skew(hot=3, strength=2.0, exponent=1.0, seed=1)
    biases = zipf_biases(n_experts=8, n_layers=4, skew=skew)
    assert len(biases) == 4
    for row in biases:
        assert sorted((b for b in row if b), reverse=True) == pytest.approx([2.0, 1.0, 2.0 / 3])
        assert sum(1 for b in row if b == 0) == 5
    assert len({tuple(row) for row in biases}) > 1  # drawn per layer
    assert zipf_biases(n_experts=8, n_layers=4, skew=skew) == biases  # seeded
    with pytest.raises(ValueError, match="hot=9"):
        zipf_biases(n_experts=8, n_layers=1, skew=Skew(hot=9))
