"""Cancel a request's work when its client goes away before the answer (non-streaming requests).

uvicorn does not cancel a handler whose client disconnected; a streaming answer notices when a write
fails, but a non-streaming one would run to its end for no one. Once the body has been read, the only
message left for the app is `http.disconnect`, sent when the connection closes (or once the answer is
complete), so a watcher waiting for it can cancel the work. The engine server aborts the request in the
scheduler that way; the router closes its connection to the backend, whose own watcher then does. The
router also stops waiting at its drain deadline (`ended`: router/in_flight.py), and answers 503 there and
then; `unless_ended` does that for a body still being read (a slow client's upload).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready; the work was cancelled."""


class Ended(Exception):
    """The server ended the request (its drain deadline) before the answer was ready; the work was
    cancelled."""


async def unless_disconnected(
    request: Request, work: Coroutine[Any, Any, T], *, ended: asyncio.Future[None] | None = None
) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client disconnects first, or Ended
    (likewise) if `ended` is done first. The request's body must have been read already."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        task = await _until(work, {watcher} if ended is None else {watcher, ended})
    finally:
        watcher.cancel()
    if task.cancelled():
        raise Ended if ended is not None and ended.done() else ClientGone
    return task.result()


async def unless_ended(work: Coroutine[Any, Any, T], ended: asyncio.Future[None]) -> T:
    """`work`'s result, or Ended (with `work` cancelled) if `ended` is done first: for reading a request's
    body, which `unless_disconnected` cannot watch (the body's messages are the work's to read)."""
    if ended.done():
        work.close()
        raise Ended
    task = await _until(work, {ended})
    if task.cancelled():
        raise Ended
    return task.result()


async def _until(work: Coroutine[Any, Any, T], stops: set[asyncio.Future[Any]]) -> asyncio.Future[T]:
    """`work` run until it or one of `stops` is done; then cancelled (and waited for) if it is not done.
    Its task, done or cancelled."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, *stops}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
