"""How far the serving pods that are not ready yet have got with their weights.

A torch-engine pod answers GET /ready with 503 and {"status": "loading", "bytes": B, "bytesTotal": T}
while its ranks read their weights (the runtime's serve/app.py); the reconciler reads the pods that
run but are not ready (at most MAX_PODS, concurrently), sums them per role, and the GroupsNotReady
message says it: "decode: 0/2 ready; loading weights: decode 3.2 GiB of 12.0 GiB (27%, 2 pods)".
Engines that answer no such body (vLLM, SGLang, TGI) are simply not counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubemoe_operator.api.labels import LABEL_ROLE, ROUTER
from kubemoe_operator.plan.command import PORT
from kubemoe_operator.reconcile.pod_http import PodReader, count, human_bytes
from kubemoe_operator.render.model_cache import CACHE_ROLE

MAX_PODS = 32
"""Pods read per reconcile: enough for a message, bounded for a wide deployment."""


@dataclass(frozen=True)
class Loading:
    """One role's pods that are loading: bytes read and to read, summed."""

    bytes: int
    total: int
    pods: int


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def loading_pods(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, pod IP) of each serving pod that runs and is not ready: the ones that may be loading."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        role = (meta.get("labels") or {}).get(LABEL_ROLE)
        if role in (None, ROUTER, CACHE_ROLE) or meta.get("deletionTimestamp"):
            continue
        if status.get("phase") == "Running" and status.get("podIP") and not _ready(pod):
            out.append((str(role), str(status["podIP"])))
    return sorted(out)[:MAX_PODS]


def parse_loading(body: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(bytes, bytesTotal) from a /ready body that says it is loading; None for anything else."""
    if not isinstance(body, Mapping) or body.get("status") != "loading":
        return None
    done, total = count(body.get("bytes")), count(body.get("bytesTotal"))
    if done is None or total is None or total == 0 or done > total:
        return None
    return done, total


async def loading_progress(pods: Iterable[Mapping[str, Any]], read_pod: PodReader) -> dict[str, Loading]:
    """Per role, the loading pods' bytes; roles with none loading are left out."""
    targets = loading_pods(pods)
    bodies = await asyncio.gather(*(read_pod(ip, PORT, "/ready") for _, ip in targets))
    sums: dict[str, Loading] = {}
    for (role, _), body in zip(targets, bodies, strict=True):
        parsed = parse_loading(body)
        if parsed is None:
            continue
        was = sums.get(role, Loading(0, 0, 0))
        sums[role] = Loading(was.bytes + parsed[0], was.total + parsed[1], was.pods + 1)
    return sums


def describe_loading(loading: Mapping[str, Loading]) -> str:
    """'loading weights: decode 3.2 GiB of 12.0 GiB (27%, 2 pods)', or '' when nothing is loading."""
    parts = [
        f"{role} {human_bytes(s.bytes)} of {human_bytes(s.total)} ({100 * s.bytes / s.total:.0f}%, "
        f"{s.pods} pod{'s' if s.pods != 1 else ''})"
        for role, s in sorted(loading.items())
    ]
    return "loading weights: " + ", ".join(parts) if parts else ""
