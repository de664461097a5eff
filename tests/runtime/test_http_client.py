"""The kept-alive connection pool the router and the KV pull share (pod/keepalive.py), on a fake clock."""

from __future__ import annotations

from kubemoe_runtime.pod.keepalive import IdlePool


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool(clock: Clock, closed: list[str], *, usable: set[str] | None = None) -> IdlePool[str, str]:
    return IdlePool(
        max_idle=2,
        close=closed.append,
        usable=(lambda c: c in usable) if usable is not None else (lambda _: True),
        idle_s=4.0,
        clock=clock,
    )


def test_the_newest_idle_connection_is_taken_first_and_at_most_max_idle_are_kept() -> None:
    clock, closed = Clock(), list[str]()
    p = pool(clock, closed)
    for conn in ("a", "b", "c"):
        p.give("backend:1", conn)
    assert closed == ["c"], "a third idle connection is closed, not kept"
    assert p.take("backend:1") == "b"
    assert p.take("backend:1") == "a"
    assert p.take("backend:1") is None
    assert p.take("other:1") is None


def test_a_connection_idle_too_long_or_closed_by_its_server_is_closed_not_taken() -> None:
    clock, closed = Clock(), list[str]()
    usable = {"fresh"}
    p = pool(clock, closed, usable=usable)
    p.give("b:1", "old")
    clock.now = 3.0
    p.give("b:1", "gone")  # its server closed it meanwhile: not usable
    p.give("c:1", "fresh")
    clock.now = 4.5  # "old" is past idle_s
    assert p.take("b:1") is None
    assert sorted(closed) == ["gone", "old"]
    assert p.take("c:1") == "fresh"


def test_a_sweep_forgets_addresses_whose_connections_all_expired() -> None:
    clock, closed = Clock(), list[str]()
    p = pool(clock, closed)
    p.give("pod-that-left:1", "x")
    clock.now = 10.0
    p.give("pod-still-here:1", "y")  # any call sweeps
    assert closed == ["x"]
    assert p.idle("pod-that-left:1") == 0
    p.close_all()
    assert closed == ["x", "y"]
