"""A vLLM leader of a 32-rank group, scraped without Prometheus: its /metrics carries vLLM's own series for
every rank of the group (1.5 MB, past the scrape's 1 MiB cap: the role's metrics were unavailable for
good), so the autoscaler asks the front for its own page (`?kubemoe=1`), the kubemoe_* series alone.

The front is the runtime's (engines/vllm/front.py, in uvicorn); the "vLLM" behind it serves the page the
installed vLLM's own PrometheusStatLogger renders for 32 engines (vllm_pages.py), each engine's queue
set to its index."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_operator.autoscale.pages import AUTOSCALER_QUERY, MAX_PAGE_BYTES
from kubemoe_operator.autoscale.removal import LeastLoaded
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.pods import Leader
from kubemoe_runtime.engines.vllm import front as vllm_front
from kubemoe_runtime.engines.vllm.front import VllmUpstream, front_app
from kubemoe_runtime.pod.metrics import MetricLabels
from tests.operator.autoscale.static_pages import static_pages
from tests.operator.autoscale.vllm_pages import vllm_page, with_waiting
from tests.runtime.app_thread import serving

pytestmark = pytest.mark.slow  # vLLM renders the page in its own interpreter once: ~10 s

SEL = RoleSelector(namespace="ns", deployment="deepseek-v3", role="decode")
RANKS = 32


@pytest.fixture(scope="module")
def leader() -> Iterator[str]:
    """The front's /metrics URL, in front of a "vLLM" serving the 32-rank page."""
    page = with_waiting(vllm_page(RANKS)).encode()
    assert len(page) > MAX_PAGE_BYTES  # the shape that was refused: 1.5 MB
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    labels = MetricLabels(deployment="deepseek-v3", role="decode", group="0", rank="0")
    try:
        with static_pages({"metrics": page, "health": b"ok"}) as urls:
            vllm_url = urls["metrics"].removesuffix("/metrics")
            upstream = VllmUpstream(process=process, url=vllm_url, headless=False, labels=labels)
            with serving(front_app(upstream), what="the front") as port:
                yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.kill()
        process.wait()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def test_both_sides_name_the_same_query() -> None:
    assert f"{vllm_front.AUTOSCALER_QUERY}=1" == AUTOSCALER_QUERY


def test_prometheus_still_gets_the_whole_page_and_the_autoscaler_a_small_one(leader: str) -> None:
    whole = _get(leader).decode()
    assert len(whole) > MAX_PAGE_BYTES
    assert 'vllm:num_requests_waiting{engine="31"' in whole  # vLLM's own, every rank, unchanged
    small = _get(f"{leader}?{AUTOSCALER_QUERY}")
    assert len(small) < 64 << 10, len(small)
    names = {s.name for f in text_string_to_metric_families(small.decode()) for s in f.samples}
    assert names, "the autoscaler's page is empty"
    assert all(name.startswith("kubemoe_") for name in names), sorted(names)
    assert {"kubemoe_requests_waiting", "kubemoe_inter_token_latency_seconds_bucket"} <= names


async def test_the_scrape_reads_a_32_rank_leader(leader: str) -> None:
    async def targets(_: RoleSelector) -> list[str]:
        return [leader]

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets)
        first = await source.sample(SEL, ["queue-depth", "kv-cache-usage", "itl-p90"])
        second = await source.sample(SEL, ["itl-p90"])
    assert first["queue-depth"] == sum(range(RANKS))  # every rank's queue, one group
    assert first["kv-cache-usage"] == 0.0
    assert second["itl-p90"] == 0.0  # the histogram is there and observed nothing: idle, not missing


async def test_the_scale_down_choice_reads_it_too(leader: str) -> None:
    pod = {"metadata": {"name": "p", "ownerReferences": [{"kind": "ReplicaSet", "controller": True}]}}
    async with httpx2.AsyncClient() as client:
        chooser = LeastLoaded(kube=None, leaders=None, client=client)  # type: ignore[arg-type]
        assert await chooser._load(Leader(pod=pod, url=leader), SEL) == sum(range(RANKS))
