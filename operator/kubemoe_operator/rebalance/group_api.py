"""The rebalancer's two requests to a group leader (docs/expert-load.md): its expert load, and a new
placement."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx2

from kubemoe_operator.kube.pods import Leader
from kubemoe_operator.rebalance.failures import refusal
from kubemoe_operator.rebalance.loads import GroupLoad, LoadError, parse_group_load

log = logging.getLogger("kubemoe.rebalance")

MAX_BODY = 8 << 20
"""A load document is ~11 bytes per expert and layer (DeepSeek-V3: ~0.3 MiB); a longer one is not read."""


async def fetch_load(client: httpx2.AsyncClient, leader: Leader) -> GroupLoad | str:
    """The leader's load, or a one-line reason why not."""
    try:
        async with client.stream("GET", f"{leader.base}/v1/experts/load", timeout=10.0) as resp:
            if resp.status_code != 200:
                return f"{leader.name} answered {resp.status_code}"
            raw = bytearray()
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_BODY:
                    return f"{leader.name}'s expert load is longer than {MAX_BODY >> 20} MiB"
        return parse_group_load(json.loads(raw))
    except httpx2.HTTPError as err:
        return f"{leader.name} did not answer: {err!r:.120}"
    except (ValueError, LoadError) as err:  # JSON or shape
        return f"{leader.name} sent an unusable expert load: {err!s:.200}"


async def send_placement(
    client: httpx2.AsyncClient, leader: Leader, placement: Mapping[str, Any]
) -> bool | str:
    """Send a placement to one group: True when the group took it (202, or 200: already there); its
    words when it refused the document for good (failures.refusal: a try that failed); False when it
    may take it at a later check (no answer, busy loading another, 5xx)."""
    try:
        resp = await client.post(f"{leader.base}/v1/experts/placement", json=placement, timeout=10.0)
    except httpx2.HTTPError as err:
        log.warning("rebalancer: %s did not take the placement: %r", leader.name, err)
        return False
    if resp.status_code in (200, 202):
        return True
    log.warning(
        "rebalancer: %s answered %s to placement generation %s: %.300s",
        leader.name,
        resp.status_code,
        placement.get("generation"),
        resp.text,
    )
    said = refusal(resp.status_code, resp.text)
    return False if said is None else said
