"""GET /v1/models through the router: the served model names, with the backends' max_model_len.

The operator does not pass max_model_len to the router, so the router asks one backend (its own
GET /v1/models, within MODELS_PROBE_S, another backend if that one fails) and keeps the answer for
MODELS_TTL_S; while no backend answers it shows the last one learned, null until one has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from kubemoe_runtime.pod.openai_responses import ModelCard
from kubemoe_runtime.router.checks import json_object
from kubemoe_runtime.router.dispatch import Dispatcher
from kubemoe_runtime.router.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("kubemoe_runtime.router")
MODELS_TTL_S = 30.0  # how long a backend's max_model_len is kept before it is asked again
MODELS_PROBE_S = 5.0  # the most a backend may take to answer the router's own GET /v1/models


class ModelCards:
    def __init__(self, dispatch: Dispatcher, *, role: str, served_names: Sequence[str], created: int) -> None:
        self.dispatch = dispatch
        self.role = role  # whom to ask: the role forwarded requests go to
        self.served_names = tuple(served_names)
        self.created = created
        self._max_model_len: int | None = None
        self._max_model_len_at = 0.0
        self._lock = asyncio.Lock()

    async def cards(self) -> list[ModelCard]:
        max_model_len = await self.max_model_len()
        return [
            ModelCard(id=name, created=self.created, root=name, max_model_len=max_model_len)
            for name in self.served_names
        ]

    async def max_model_len(self) -> int | None:
        """The backends' max_model_len, from a backend's own /v1/models, kept MODELS_TTL_S; while no backend
        answers, the last one learned (None, shown as null, until one has)."""
        async with self._lock:
            if self._max_model_len is None or time.monotonic() - self._max_model_len_at >= MODELS_TTL_S:
                learned = await self._ask()
                if learned is not None:
                    self._max_model_len, self._max_model_len_at = learned, time.monotonic()
            return self._max_model_len

    async def _ask(self) -> int | None:
        upstream = self.dispatch.upstream
        tried: set[str] = set()
        for _ in range(self.dispatch.max_attempts):
            backend = self.dispatch.pick(self.role, key="", exclude=tried)
            if backend is None:
                return None
            tried.add(backend.address)
            deadline = asyncio.get_running_loop().time() + MODELS_PROBE_S
            try:
                response = await upstream.request(
                    "GET",
                    backend.address,
                    "/v1/models",
                    b"",
                    {"accept": "application/json"},
                    deadline=deadline,
                )
                try:
                    data = await response.read()
                finally:
                    await response.aclose()
            except (UpstreamError, UpstreamTimeout) as err:
                log.warning("router: GET /v1/models of %s failed: %s", backend.address, err)
                continue
            if response.status == 200 and (found := max_model_len_of(data, self.served_names)):
                return found
            log.warning(
                "router: %s's /v1/models (%d) names no max_model_len", backend.address, response.status
            )
        return None


def max_model_len_of(data: bytes, names: Sequence[str]) -> int | None:
    """max_model_len from a /v1/models answer: the served name's card, else the first card that has one."""
    cards = json_object(data).get("data")
    if not isinstance(cards, list):
        return None
    cards = [c for c in cards if isinstance(c, dict)]
    ordered = [c for c in cards if c.get("id") in names] + cards
    for card in ordered:
        value = card.get("max_model_len")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
