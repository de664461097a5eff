"""PromQL per metric, answers shaped as the Prometheus HTTP API returns them, and the quantile
arithmetic (checked against values worked out by hand from Prometheus' definition)."""

from __future__ import annotations

import math

import pytest

from kubemoe_operator.autoscale.prometheus import promql, value_of
from kubemoe_operator.autoscale.signals import RoleSelector, histogram_quantile, mean_over_groups

SEL = RoleSelector(namespace="prod", deployment="ds", role="decode")


def test_queries_select_the_role_and_aggregate_per_group() -> None:
    m = 'deployment="ds",role="decode",namespace="prod"'
    assert promql("queue-depth", SEL) == f"sum by (group) (kubemoe_requests_waiting{{{m}}})"
    assert promql("kv-cache-usage", SEL) == f"avg by (group) (kubemoe_kv_cache_usage_ratio{{{m}}})"
    assert promql("gpu-utilization", SEL) == f"avg by (group) (kubemoe_gpu_utilization_ratio{{{m}}})"
    assert promql("ttft-p90", SEL, rate_window="2m") == (
        f"histogram_quantile(0.9, sum by (le) (rate(kubemoe_time_to_first_token_seconds_bucket{{{m}}}[2m])))"
    )


def _vector(*rows: tuple[dict[str, str], str]) -> list[dict[str, object]]:
    return [{"metric": labels, "value": [1764400000.0, value]} for labels, value in rows]


def test_per_group_answers_average_over_groups() -> None:
    result = _vector(({"group": "0"}, "12"), ({"group": "1"}, "4"))
    assert value_of("queue-depth", result) == 8.0
    assert value_of("queue-depth", []) is None
    assert value_of("kv-cache-usage", _vector(({"group": "0"}, "NaN"), ({"group": "1"}, "0.5"))) == 0.5


def test_quantile_answer_is_taken_as_is_and_nan_means_missing() -> None:
    assert (
        value_of(
            "ttft-p90",
            _vector(
                ({}, "0.25"),
            ),
        )
        == 0.25
    )
    assert (
        value_of(
            "itl-p90",
            _vector(
                ({}, "NaN"),
            ),
        )
        is None
    )


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        # 10 observations: 5 in (0, 0.1], 4 in (0.1, 0.5], 1 in (0.5, +Inf]; rank 9 -> 0.1 + 0.4 * 4/4
        ([(0.1, 5.0), (0.5, 9.0), (math.inf, 10.0)], 0.5),
        # rank 0.9 * 20 = 18 inside (0.2, 1.0]: 0.2 + 0.8 * (18 - 10) / 10
        ([(0.2, 10.0), (1.0, 20.0), (math.inf, 20.0)], 0.84),
        # the q-th observation in the +Inf bucket: the highest finite bound
        ([(0.1, 1.0), (math.inf, 10.0)], 0.1),
    ],
)
def test_histogram_quantile(buckets: list[tuple[float, float]], expected: float) -> None:
    q = histogram_quantile(0.9, buckets)
    assert q is not None
    assert q == pytest.approx(expected)


def test_no_observations_is_missing() -> None:
    assert histogram_quantile(0.9, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.9, []) is None
    assert mean_over_groups({}) is None
