"""Reading a serving pod's /metrics page: the pod is the tenant's code, so every read is bounded in
bytes (a page past the cap is read no further) and in time as a whole (connect, headers and every
byte: httpx's own timeouts are per read, and a pod that sends one byte a second never trips them).

The cap: a torch-engine pod's page is about 28 KiB; a vLLM pod's about 50 KiB per engine (some
fifteen histograms of twenty-odd buckets each, labelled per engine), so a pod running eight local
data-parallel engines serves some 400 KiB. 1 MiB leaves room for that, and parsing a page that long
(pure Python, about half a second of CPU) runs off the event loop (`asyncio.to_thread`), which also
renews the operator's lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx2

T = TypeVar("T")

MAX_PAGE_BYTES = 1 << 20
"""The longest page read; a longer one is refused (PageTooLong), not read further."""


class PageTooLong(Exception):
    """A page past the cap: the pod serves something other than serving metrics."""


async def fetch_page(
    client: httpx2.AsyncClient, url: str, *, timeout_s: float, max_bytes: int = MAX_PAGE_BYTES
) -> str | None:
    """The page at `url`, or None when it does not answer 200 within `timeout_s` for the whole
    request; PageTooLong as soon as more than `max_bytes` came."""
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s), client.stream("GET", url, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return None
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise PageTooLong(f"{url} is longer than {max_bytes >> 10} KiB")
    except (httpx2.HTTPError, TimeoutError):
        return None
    return body.decode("utf-8", errors="replace")


async def gather_all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, in order; at the first exception the others are cancelled (and waited for), not
    left running in the background, and it is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
