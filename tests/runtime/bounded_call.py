"""Calling something that may never return, on a thread, so that a test fails rather than hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_within(fn: Callable[[], T], *, seconds: float, what: str) -> T:
    """`fn()` on a thread, given `seconds` to return or raise (a call that does neither runs on)."""
    result: list[T | BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} still runs after {seconds} s"
    [outcome] = result
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
