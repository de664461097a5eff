"""A scrape of the vLLM front's /metrics does not hold up the tokens it relays.

The front's one event loop relays every streamed token; a wide group's leader page (vLLM's series for
each of 32 ranks, 1.5 MB) took the old front 0.2-0.6 s to parse on that loop, and each scrape stopped
every stream for as long (the reviewer's repro: the longest gap between chunks 13 ms -> 666 ms). The
page is now rendered on a worker thread, from the lines of the families it derives from only.

The front runs in a process of its own, as in a pod (its loop and its render thread share that
process's GIL only); the "vLLM" behind it streams a chunk every 10 ms and serves the page the
installed vLLM's own PrometheusStatLogger renders for 32 engines (tests/operator/autoscale/vllm_pages.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kubemoe_runtime.pod.ports import free_port
from tests.operator.autoscale.vllm_pages import vllm_page
from tests.runtime.app_thread import serving

pytestmark = pytest.mark.slow  # vLLM renders the page once (~10 s); two 3 s streams

CHUNKS = 300
INTERVAL_S = 0.01
FRONT = """
import subprocess, sys, uvicorn
from kubemoe_runtime.engines.vllm.front import VllmUpstream, front_app
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.metrics import MetricLabels
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
labels = MetricLabels(deployment="deepseek-v3", role="decode")
upstream = VllmUpstream(process=child, url=sys.argv[1], headless=False, labels=labels)
config = server_config(front_app(upstream), host="127.0.0.1", port=int(sys.argv[2]), lifespan="on")
try:
    uvicorn.Server(config).run()
finally:
    child.kill()
"""


def stand_in_vllm(page: str) -> Starlette:
    async def metrics(_: Request) -> Response:
        return PlainTextResponse(page)

    async def health(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def stream(_: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(CHUNKS):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(INTERVAL_S)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    routes = [
        Route("/metrics", metrics),
        Route("/health", health),
        Route("/v1/stream", stream, methods=["POST"]),
    ]
    return Starlette(routes=routes)


@pytest.fixture(scope="module")
def page() -> str:
    return vllm_page(32)


@pytest.fixture(scope="module")
def front(page: str) -> Iterator[str]:
    """The front's base URL, its process in front of the stand-in vLLM."""
    with serving(stand_in_vllm(page), what="the stand-in vLLM") as vllm_port:
        port = free_port()
        argv = [sys.executable, "-c", FRONT, f"http://127.0.0.1:{vllm_port}", str(port)]
        process = subprocess.Popen(argv, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, "the front exited"
                assert time.monotonic() < deadline, "the front did not start"
                with contextlib.suppress(httpx2.TransportError):
                    if httpx2.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                time.sleep(0.1)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


async def longest_gap(front: str, *, scrape: bool) -> tuple[float, int]:
    """The longest gap between two chunks of one stream through the front (its first chunk aside), and
    the scrapes made of the front's /metrics meanwhile, alternately whole and the autoscaler's page."""
    gaps: list[float] = []
    scrapes = 0
    done = asyncio.Event()
    async with httpx2.AsyncClient(timeout=60) as client:

        async def consume() -> None:
            last = time.perf_counter()
            async with client.stream("POST", f"{front}/v1/stream", content=b"{}") as response:
                async for _ in response.aiter_raw():
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
            done.set()

        async def scraper() -> None:
            nonlocal scrapes
            await asyncio.sleep(0.3)
            while not done.is_set():
                query = "?kubemoe=1" if scrapes % 2 else ""
                assert (await client.get(f"{front}/metrics{query}")).status_code == 200
                scrapes += 1

        await asyncio.gather(consume(), *([scraper()] if scrape else []))
    return max(gaps[1:]), scrapes


async def test_scrapes_do_not_stall_the_streams_the_front_relays(front: str, page: str) -> None:
    quiet, _ = await longest_gap(front, scrape=False)
    scraped, scrapes = await longest_gap(front, scrape=True)
    started = time.perf_counter()
    list(text_string_to_metric_families(page))  # what the old front did on its loop, each scrape
    parse_s = time.perf_counter() - started
    assert scrapes >= 3
    # Generous: a scrape may cost the stream a few quiet gaps, never half of parsing the page.
    allowed = max(5 * quiet, quiet + parse_s / 2)
    assert scraped < allowed, (
        f"longest gap {scraped * 1000:.0f} ms while scraped ({scrapes} scrapes), "
        f"{quiet * 1000:.0f} ms without; parsing the page takes {parse_s * 1000:.0f} ms"
    )
