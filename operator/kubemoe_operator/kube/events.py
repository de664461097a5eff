"""Events aggregated as client-go's EventCorrelator does, so a busy autoscaler does not leave an Event
object per decision (#20). Pure: it decides, `Kube.post_event` writes.

- The same Event again (involved object, type, reason, source and message) within `window_seconds` of
  its last sighting PATCHes the Event first created for it: `count` + 1, `lastTimestamp`, `message`.
- Similar Events (the same but for the message: the autoscaler's carry its readings) are combined once
  `max_similar` different messages came within the window: the Event then reads
  "(combined from similar events): <latest message>" and every further one PATCHes that Event.

client-go's defaults: a 10-minute window, 10 similar messages, 4096 remembered Events (least recently
seen forgotten first). What it remembers is this process's memory: after a restart, or once the API
server has expired an Event (`--event-ttl`, 1 h), the next one is created anew.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

COMBINED = "(combined from similar events): "

AggregateKey = tuple[str, ...]
"""The involved object (uid, kind, namespace, name), type, reason and source of an Event."""
EventKey = tuple[str, ...]
"""An AggregateKey and the message ("" for the combined Event)."""


@dataclass(frozen=True)
class CreateEvent:
    """POST this Event; then `EventCorrelator.created` with the name the API server gave it."""

    key: EventKey
    body: dict[str, Any]


@dataclass(frozen=True)
class PatchEvent:
    """PATCH (a merge patch) the Event `name` this process created before; then `EventCorrelator.patched`.
    If it is gone (404), `EventCorrelator.forget` it and observe the Event again (a create)."""

    key: EventKey
    namespace: str
    name: str
    patch: dict[str, Any]


@dataclass
class _Posted:
    namespace: str
    name: str
    count: int
    seen: float


@dataclass
class _Similar:
    messages: OrderedDict[str, None] = field(default_factory=OrderedDict)
    seen: float = 0.0


def _aggregate_key(event: Mapping[str, Any]) -> AggregateKey:
    obj = event["involvedObject"]
    source = event.get("source") or {}
    return (
        str(obj.get("uid") or ""),
        str(obj.get("kind") or ""),
        str(obj.get("namespace") or ""),
        str(obj.get("name") or ""),
        str(event.get("type") or ""),
        str(event.get("reason") or ""),
        str(source.get("component") or event.get("reportingComponent") or ""),
    )


class EventCorrelator:
    def __init__(
        self,
        *,
        window_seconds: float = 600.0,
        max_similar: int = 10,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window_seconds
        self.max_similar = max_similar
        self.size = size
        self.clock = clock
        self._similar: OrderedDict[AggregateKey, _Similar] = OrderedDict()
        self._posted: OrderedDict[EventKey, _Posted] = OrderedDict()

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.size:
            cache.popitem(last=False)

    def observe(self, event: Mapping[str, Any]) -> CreateEvent | PatchEvent:
        """What to write for `event` (an Event body as `event_body` makes it)."""
        now = self.clock()
        body = copy.deepcopy(dict(event))
        aggregate = _aggregate_key(body)
        similar = self._similar.get(aggregate)
        if similar is None or now - similar.seen > self.window:
            similar = _Similar()
        similar.messages[str(body.get("message", ""))] = None
        similar.messages.move_to_end(str(body.get("message", "")))
        while len(similar.messages) > self.max_similar:  # bounded: the oldest messages are dropped
            similar.messages.popitem(last=False)
        similar.seen = now
        self._remember(self._similar, aggregate, similar)
        if len(similar.messages) < self.max_similar:
            key: EventKey = (*aggregate, str(body.get("message", "")))
        else:
            key = (*aggregate, "")
            body["message"] = (COMBINED + str(body.get("message", "")))[:1024]

        posted = self._posted.get(key)
        if posted is None or now - posted.seen > self.window:
            return CreateEvent(key, body)
        patch = {
            "count": posted.count + 1,
            "lastTimestamp": body.get("lastTimestamp"),
            "message": body.get("message"),
        }
        return PatchEvent(key, posted.namespace, posted.name, patch)

    def created(self, key: EventKey, *, namespace: str, name: str) -> None:
        self._remember(self._posted, key, _Posted(namespace, name, 1, self.clock()))

    def patched(self, action: PatchEvent) -> None:
        self._remember(
            self._posted,
            action.key,
            _Posted(action.namespace, action.name, action.patch["count"], self.clock()),
        )

    def forget(self, key: EventKey) -> None:
        self._posted.pop(key, None)
