"""Reading a serving pod's /metrics page: the pod is the tenant's code, so every read is bounded in
bytes (a page past the cap is read no further) and in time as a whole (connect, headers and every
byte: httpx's own timeouts are per read, and a pod that sends one byte a second never trips them).

Every read asks for the autoscaler's page, `/metrics?kubemoe=1` (AUTOSCALER_QUERY): a vLLM pod's front
then serves the kubemoe_* and kubemoe_gpu_* series alone, a few KiB, where its whole page carries vLLM's
own series for every data-parallel rank of its group (about 46 KiB a rank: 1.5 MiB for a 32-rank group's
leader, past the cap). A torch-engine pod ignores the query and serves its whole page, about 28 KiB.

The cap: 1 MiB leaves room for a whole vLLM page of some twenty ranks (a pod with an older runtime,
which ignores the query), and parsing a page that long (pure Python, about half a second of CPU) runs
off the event loop (`asyncio.to_thread`), which also renews the operator's lease. Only the lines of the
series read are parsed (`series_lines`): prometheus_client's parser takes time quadratic in a line's
length on some lines (a 1 MiB comment line: 13 s of CPU, in a thread a timeout cannot stop).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Coroutine
from typing import Any, TypeVar

import httpx2

T = TypeVar("T")

MAX_PAGE_BYTES = 1 << 20
"""The longest page read; a longer one is refused (PageTooLong), not read further."""
AUTOSCALER_QUERY = "kubemoe=1"
"""What every read adds to the page's URL: the runtime's vLLM front (engines/vllm/front.py) then serves
only the series the autoscaler reads."""


def autoscaler_url(url: str) -> str:
    """`url` asking for the autoscaler's page."""
    return f"{url}{'&' if '?' in url else '?'}{AUTOSCALER_QUERY}"


MAX_LINE = 4096
"""The longest line of a series read: the runtime's are under 300 characters; a longer one is refused."""
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")


def series_lines(text: str, families: Collection[str]) -> str:
    """The lines of `text` about `families` (their samples, histogram buckets, counts and sums included,
    and their # TYPE and # HELP lines); the rest of the page is not parsed (module docstring).
    ValueError for such a line longer than MAX_LINE, or a line that starts with no series name (not
    this text format at all)."""
    kept: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line[:MAX_LINE].split(None, 3)
            if len(parts) < 3 or parts[1] not in ("TYPE", "HELP") or parts[2] not in families:
                continue
        else:
            found = _NAME.match(line, 0, MAX_LINE)
            if found is None:
                if not line.strip():
                    continue
                raise ValueError(f"not the Prometheus text format: {line[:80]!r}")
            name = found.group()
            if name not in families and not any(
                name.endswith(end) and name[: -len(end)] in families for end in _SUFFIXES
            ):
                continue
        if len(line) > MAX_LINE:
            raise ValueError(f"a line of {line[:80]!r}... is longer than {MAX_LINE} characters")
        kept.append(line)
    return "\n".join(kept) + "\n"


class PageTooLong(Exception):
    """A page past the cap: the pod serves something other than serving metrics."""


async def fetch_page(
    client: httpx2.AsyncClient, url: str, *, timeout_s: float, max_bytes: int = MAX_PAGE_BYTES
) -> str | None:
    """The autoscaler's page of the pod at `url` (its /metrics, AUTOSCALER_QUERY added), or None when
    it does not answer 200 within `timeout_s` for the whole request; PageTooLong as soon as more than
    `max_bytes` came."""
    body = bytearray()
    page = autoscaler_url(url)
    try:
        async with asyncio.timeout(timeout_s), client.stream("GET", page, timeout=timeout_s) as resp:
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
