"""The router's requests in flight, for its drain deadline to end (pod/drain.py's `on_timeout`).

At the deadline the router answers what it still holds there and then, rather than leave uvicorn to
cancel its handlers SHUTDOWN_S later (a plain-text 500 for a whole answer; a stream cut with no error
event and no [DONE], counted 200): a request still waiting for its backend gets a 503 `draining`
(`ended`, which `unless_disconnected` watches: pod/disconnect.py), and an answer being relayed
(`relaying`) has its backend connection closed (`UpstreamResponse.end`), so that it ends as relay.py ends
a cut answer, an SSE one with that 503 as an error event and [DONE], but without ejecting the backend.
Each is counted 503. All of it runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.router.upstream import UpstreamResponse

ENDED_AT_DRAIN_DEADLINE: Final = (
    "the router shut down at the end of its drain timeout before this answer was complete; try again"
)


def drain_deadline_error() -> ApiError:
    """What a request the drain deadline ended is told (the same code as one refused while draining)."""
    return ApiError(503, ENDED_AT_DRAIN_DEADLINE, type="server_error", code="draining", retry_after=1)


class InFlight:
    def __init__(self) -> None:
        self._relayed: set[UpstreamResponse] = set()
        self._ended: asyncio.Future[None] | None = None

    def ended(self) -> asyncio.Future[None]:
        """Done once `end_all` has run (made on the running event loop, at first use)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        return self._ended

    @property
    def is_ended(self) -> bool:
        return self._ended is not None and self._ended.done()

    @contextlib.contextmanager
    def relaying(self, response: UpstreamResponse) -> Iterator[None]:
        """While `response` is relayed, `end_all` ends it; at once if it already ran."""
        self._relayed.add(response)
        if self.is_ended:
            response.end()
        try:
            yield
        finally:
            self._relayed.discard(response)

    def end_all(self) -> int:
        """End every request in flight now (see the module docstring), and any that gets this far later;
        returns how many answers were being relayed."""
        ended = self.ended()
        if not ended.done():
            ended.set_result(None)
        relayed = list(self._relayed)
        for response in relayed:
            response.end()
        return len(relayed)
