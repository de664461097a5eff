"""Reading a pod's own JSON over HTTP during a reconcile: a model.cache fill pod's GET /progress, a
loading engine's GET /ready. Untrusted and best effort: slow (1 s), large (64 KiB), not JSON or not an
object is None, and the status then shows no counts until a later reconcile reads them."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx2

PodReader = Callable[[str, int, str], Awaitable[Mapping[str, Any] | None]]
"""(pod IP, port, path) -> the JSON object the pod answers (any status: /ready answers 503 while
loading), or None when it cannot be read."""

MAX_BODY = 64 << 10


def pod_reader(http: httpx2.AsyncClient, *, timeout: float = 1.0) -> PodReader:
    async def read(ip: str, port: int, path: str) -> Mapping[str, Any] | None:
        host = f"[{ip}]" if ":" in ip else ip
        try:
            async with http.stream("GET", f"http://{host}:{port}{path}", timeout=timeout) as resp:
                raw = bytearray()
                async for chunk in resp.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_BODY:
                        return None
            body = json.loads(raw)
        except (httpx2.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    return read


def count(value: Any) -> int | None:
    """A non-negative integer from a pod's JSON (untrusted): anything else (a bool, a string, a
    negative, an infinity, beyond 2**62) is None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > 2**62:
        return None
    return int(value)


def human_bytes(n: int) -> str:
    """3.2 GiB, or 512.0 MiB below one GiB: byte counts in status messages."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
