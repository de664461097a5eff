"""Metrics the autoscaler cannot trust: a pod (the tenant's code) may serve anything on /metrics,
and Prometheus may answer anything. Each must end as "metrics unavailable" for that deployment
(MetricsUnavailable, or a sample of None), never as an exception out of the autoscaler.

The pages come from a real HTTP server (http.server in a thread) serving the bytes a test sets."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemoe_operator.api.spec import Autoscaling, MetricTarget, MetricType
from kubemoe_operator.autoscale.decide import decide
from kubemoe_operator.autoscale.loop import Autoscaler
from kubemoe_operator.autoscale.prometheus import MetricsUnavailable, value_of
from kubemoe_operator.autoscale.scrape import MAX_PAGE_BYTES, ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector

SEL = RoleSelector(namespace="default", deployment="ds", role="decode")
ALL: list[MetricType] = ["queue-depth", "kv-cache-usage", "gpu-utilization", "ttft-p90", "itl-p90"]
LABELS = 'deployment="ds",role="decode",group="0",rank="0"'


class _Page:
    body = b""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = _Page.body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the scraper hangs up on a page past its cap
            self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pod_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()


async def _sample(url: str, body: bytes, metrics: list[MetricType] = ALL) -> dict[MetricType, float | None]:
    _Page.body = body

    async def targets(_: RoleSelector) -> list[str]:
        return [url]

    async with httpx2.AsyncClient() as client:
        return await ScrapeSource(client=client, targets=targets).sample(SEL, metrics)


@pytest.mark.parametrize(
    ("page", "why"),
    [
        (b"<html>not metrics</html>\n", "unreadable"),
        (f"kubemoe_requests_waiting{{{LABELS}}} +Inf\n".encode(), "is inf"),
        (f"kubemoe_requests_waiting{{{LABELS}}} NaN\n".encode(), "is nan"),
        (f"kubemoe_kv_cache_usage_ratio{{{LABELS}}} -3\n".encode(), "is -3"),
        (f"kubemoe_requests_waiting{{{LABELS}}} 1e999\n".encode(), "is inf"),
        (
            b"# TYPE kubemoe_time_to_first_token_seconds histogram\n"
            + f'kubemoe_time_to_first_token_seconds_bucket{{{LABELS},le="x"}} 1\n'.encode(),
            "unreadable",
        ),
        (b'kubemoe_requests_waiting{deployment="ds" 1\n', "unreadable"),
        (b"\xff\xfe\x00garbage\n", "unreadable"),
    ],
)
async def test_a_hostile_page_makes_metrics_unavailable(pod_url: str, page: bytes, why: str) -> None:
    with pytest.raises(MetricsUnavailable, match=why):
        await _sample(pod_url, page)


async def test_a_page_past_the_cap_is_not_read_whole(pod_url: str) -> None:
    page = f"kubemoe_requests_waiting{{{LABELS}}} 1\n".encode() * (MAX_PAGE_BYTES // 40 + 10)
    assert len(page) > MAX_PAGE_BYTES
    with pytest.raises(MetricsUnavailable, match="longer than"):
        await _sample(pod_url, page)


GOOD = f"kubemoe_requests_waiting{{{LABELS}}} 7\n".encode()


async def test_a_page_that_takes_the_parser_seconds_is_read_in_milliseconds(pod_url: str) -> None:
    """prometheus_client's parser takes time quadratic in a line's length on some lines, in a thread the
    interval's timeout cannot stop: a comment line of most of a MiB took 13 s of CPU, and every interval
    started another. Only the lines of the series read are parsed now; one of those past MAX_LINE is
    refused unparsed. Bounded in the process's CPU time (the old code: seconds, the new: milliseconds)."""
    comment = b"#" + b" " * (MAX_PAGE_BYTES - len(GOOD) - 10) + b"x\n"
    escaped = f'kubemoe_requests_waiting{{{LABELS},x="'.encode() + b'\\"' * (MAX_PAGE_BYTES // 3) + b'"} 1\n'
    started = time.process_time()
    assert await _sample(pod_url, comment + GOOD, ["queue-depth"]) == {"queue-depth": 7.0}
    with pytest.raises(MetricsUnavailable, match="longer than"):
        await _sample(pod_url, escaped, ["queue-depth"])
    spent = time.process_time() - started
    assert spent < 3.0, f"{spent:.1f} s of CPU to read two pages"


async def test_a_good_page_still_reads(pod_url: str) -> None:
    got = await _sample(pod_url, f"kubemoe_requests_waiting{{{LABELS}}} 7\n".encode(), ["queue-depth"])
    assert got == {"queue-depth": 7.0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    page=st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "kubemoe_requests_waiting",
                        "kubemoe_kv_cache_usage_ratio",
                        "kubemoe_gpu_utilization_ratio",
                        "kubemoe_time_to_first_token_seconds_bucket",
                        "# TYPE kubemoe_time_to_first_token_seconds histogram\n"
                        "kubemoe_time_to_first_token_seconds_bucket",
                    ]
                ),
                st.text(max_size=20),
                st.one_of(st.floats().map(repr), st.text(max_size=8)),
            ),
            max_size=6,
        ).map(lambda rows: "".join(f"{n}{{{LABELS}{extra}}} {v}\n" for n, extra, v in rows).encode()),
    )
)
def test_any_page_is_read_or_refused(pod_url: str, page: bytes) -> None:
    try:
        got = asyncio.run(_sample(pod_url, page))
    except MetricsUnavailable:
        return
    for value in got.values():  # what is read is a number the decision can use, or nothing
        assert value is None or (math.isfinite(value) and value >= 0)


@pytest.mark.parametrize(
    "result",
    [
        [{"metric": {}, "value": [1, "+Inf"]}],
        [{"metric": {}, "value": [1, "NaN"]}],
        [{"metric": {"group": "0"}, "value": [1, "-Inf"]}],
    ],
)
def test_prometheus_non_finite_values_are_no_reading(result: list[dict[str, Any]]) -> None:
    assert value_of("queue-depth", result) is None
    assert value_of("ttft-p90", result) is None


@pytest.mark.parametrize(
    "result",
    [[{"value": [1]}], [{"metric": {}, "value": "x"}], ["x"], [{"metric": {}, "value": [1, "lots"]}]],
)
def test_prometheus_results_of_another_shape_are_unavailable(result: list[Any]) -> None:
    with pytest.raises(MetricsUnavailable, match="unknown shape"):
        value_of("queue-depth", result)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0])
def test_a_non_finite_or_negative_sample_never_scales(value: float) -> None:
    policy = Autoscaling(min_replicas=1, max_replicas=8, metrics=[MetricTarget(type="queue-depth", target=5)])
    decision = decide(current=2, samples={"queue-depth": value}, policy=policy, history=[], now=0.0)
    assert decision.desired == 2
    assert not decision.metrics_available


async def test_a_source_that_raises_anything_is_one_roles_unavailable_metrics() -> None:
    class Broken:
        async def sample(
            self, sel: RoleSelector, metrics: list[MetricType]
        ) -> dict[MetricType, float | None]:
            raise ZeroDivisionError("a bug in a source")

    scaler = Autoscaler(kube=None, source=Broken(), source_name="test", interval_s=1.0)  # type: ignore[arg-type]
    policy = Autoscaling(min_replicas=1, max_replicas=4, metrics=[MetricTarget(type="queue-depth", target=5)])
    outcome = await scaler._evaluate_role(sel=SEL, uid="u", policy=policy, current=1, previous=None, ready=1)
    assert not outcome.available
    assert "ZeroDivisionError" in str(outcome.error)
