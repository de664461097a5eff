"""Every read of a pod's /metrics (the tenant's code) and of Prometheus is bounded as a whole: in time
(httpx's timeouts are per read, so a server that sends a byte a second never tripped them), in bytes
(a page past the cap is read no further, by the scale-down choice too) and in the event loop's time
(pages are parsed in a thread: the loop also renews the operator's lease). One page past the cap
refuses the role's sample at once: the other pods' reads are cancelled, not waited for.

The servers are real: asyncio servers on localhost that dribble or flood, http.server for pages."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from prometheus_client.metrics_core import Metric

from kubemoe_operator.autoscale import prometheus, removal, scrape
from kubemoe_operator.autoscale.prometheus import MetricsUnavailable, PrometheusSource
from kubemoe_operator.autoscale.removal import LeastLoaded
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.pods import Leader
from tests.operator.autoscale.fake_prometheus import fake_prometheus
from tests.operator.autoscale.static_pages import static_pages

SEL = RoleSelector(namespace="ns", deployment="ds", role="decode")
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
FLOOD_LIMIT = 64 << 20
"""The flooding pod gives up after this much (a reader with no cap reads all of it)."""


class Flood:
    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        chunk = b"# " + b"x" * (1 << 20) + b"\n"
        try:
            writer.write(HEAD)
            while self.sent < FLOOD_LIMIT:
                writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                await writer.drain()
                self.sent += len(chunk)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A page that never ends: one byte a second, each well inside a per-read timeout."""
    await reader.readuntil(b"\r\n\r\n")
    try:
        writer.write(HEAD)
        while True:
            writer.write(b"1\r\n#\r\n")
            await writer.drain()
            await asyncio.sleep(1.0)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve(handler: object) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
    finally:
        server.close()


@pytest.fixture
async def dribbling_pod() -> AsyncIterator[str]:
    async for url in _serve(_dribble):
        yield url


def _leader(url: str) -> Leader:
    pod = {"metadata": {"name": "p", "ownerReferences": [{"kind": "ReplicaSet", "controller": True}]}}
    return Leader(pod=pod, url=url)


async def test_a_pod_that_dribbles_its_page_times_out_as_a_whole(
    dribbling_pod: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrape, "FETCH_TIMEOUT_S", 1.0, raising=False)

    async def targets(_: RoleSelector) -> list[str]:
        return [dribbling_pod]

    started = time.monotonic()
    async with httpx2.AsyncClient() as client, asyncio.timeout(8):  # the old read never ended
        with pytest.raises(MetricsUnavailable, match="answered /metrics"):
            await ScrapeSource(client=client, targets=targets).sample(SEL, ["queue-depth"])
    assert time.monotonic() - started < 3


async def test_the_scale_down_choice_reads_a_page_within_its_time(
    dribbling_pod: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(removal, "LOAD_TIMEOUT_S", 1.0, raising=False)
    async with httpx2.AsyncClient() as client, asyncio.timeout(8):
        chooser = LeastLoaded(kube=None, leaders=None, client=client)  # type: ignore[arg-type]
        assert await chooser._load(_leader(dribbling_pod), SEL) is None


async def test_the_scale_down_choice_reads_no_further_than_the_cap() -> None:
    # it read the whole body into memory first and checked the cap after (r3: RSS 53 -> 1261 MiB)
    flood = Flood()
    async for url in _serve(flood):
        async with httpx2.AsyncClient() as client, asyncio.timeout(30):
            chooser = LeastLoaded(kube=None, leaders=None, client=client)  # type: ignore[arg-type]
            assert await chooser._load(_leader(url), SEL) is None
        await asyncio.sleep(0.2)  # the pod notices the hang-up
    assert flood.sent < 16 << 20, f"the pod got {flood.sent >> 20} MiB out before the reader hung up"


async def test_a_page_past_the_cap_refuses_the_sample_at_once(dribbling_pod: str) -> None:
    # 2 MiB: a page no serving pod serves (a torch pod's is ~28 KiB, a vLLM pod's ~50 KiB per engine);
    # the other pod's read is cancelled, not waited for to its own timeout
    line = b'kubemoe_requests_waiting{deployment="ds",role="decode",group="0",rank="0"} 1\n'
    with static_pages({"long": line * ((2 << 20) // len(line))}) as urls:

        async def targets(_: RoleSelector) -> list[str]:
            return [urls["long"], dribbling_pod]

        started = time.monotonic()
        async with httpx2.AsyncClient() as client, asyncio.timeout(8):
            with pytest.raises(MetricsUnavailable, match="longer than"):
                await ScrapeSource(client=client, targets=targets).sample(SEL, ["queue-depth"])
        assert time.monotonic() - started < scrape.FETCH_TIMEOUT_S / 2


async def test_pages_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # a page near the old 8 MiB cap was 4.5 s of pure-Python parsing on the loop that renews the lease
    parsed_on: set[int] = set()

    def recording(module: object) -> None:
        parse = module.text_string_to_metric_families  # type: ignore[attr-defined]

        def text_string_to_metric_families(text: str) -> Iterator[Metric]:
            parsed_on.add(threading.get_ident())
            return parse(text)  # type: ignore[no-any-return]

        monkeypatch.setattr(module, "text_string_to_metric_families", text_string_to_metric_families)

    recording(scrape)
    recording(removal)
    page = b'kubemoe_requests_waiting{deployment="ds",role="decode",group="0",rank="0"} 3\n'
    with static_pages({"page": page}) as urls:

        async def targets(_: RoleSelector) -> list[str]:
            return [urls["page"]]

        async with httpx2.AsyncClient() as client:
            got = await ScrapeSource(client=client, targets=targets).sample(SEL, ["queue-depth"])
            chooser = LeastLoaded(kube=None, leaders=None, client=client)  # type: ignore[arg-type]
            load = await chooser._load(_leader(urls["page"]), SEL)
    assert (got, load) == ({"queue-depth": 3.0}, 3.0)
    assert parsed_on
    assert threading.get_ident() not in parsed_on


async def test_a_prometheus_that_dribbles_its_answer_times_out_as_a_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prometheus, "QUERY_TIMEOUT_S", 1.0, raising=False)
    with fake_prometheus(lambda _: [({"group": "0"}, "3")]) as prom:
        prom.dribble = True
        started = time.monotonic()
        async with httpx2.AsyncClient() as client, asyncio.timeout(8):
            with pytest.raises(MetricsUnavailable, match="unreachable"):
                await PrometheusSource(prom.url, client=client).sample(SEL, ["queue-depth"])
        assert time.monotonic() - started < 3
