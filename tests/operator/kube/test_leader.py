"""Leader election: when a Lease is free to take, how the leader holds it, and how the operator steps
down when it loses it. Candidates share an in-memory Lease API (LeaseServer) and run in real time on
short leases (1-2 s)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx2
import kopf
import pytest
from lightkube import ApiError, AsyncClient
from lightkube.core.exceptions import ConfigError
from lightkube.models import meta_v1
from lightkube.resources.coordination_v1 import Lease

from kubemoe_operator import __main__ as operator_main
from kubemoe_operator.kube.leader import LeaderElector, LeaseConfig, lease_free_for
from kubemoe_operator.run.settings import OperatorSettings


@pytest.mark.parametrize(
    ("spec", "unchanged_for", "free"),
    [
        ({}, 0.0, True),
        ({"holderIdentity": "me", "leaseDurationSeconds": 15}, 0.0, True),
        ({"holderIdentity": "other", "leaseDurationSeconds": 15}, 15.0, False),
        ({"holderIdentity": "other", "leaseDurationSeconds": 15}, 15.1, True),
    ],
)
def test_lease_is_free_when_unheld_mine_or_unchanged_for_its_duration(
    spec: dict[str, object], unchanged_for: float, free: bool
) -> None:
    assert lease_free_for(spec, identity="me", unchanged_for=unchanged_for) is free


def _api_error(code: int) -> ApiError:
    return ApiError(status=meta_v1.Status(code=code, message=f"HTTP {code}"))


class LeaseServer:
    """The Lease part of an API server, in memory: one Lease, a resourceVersion bumped on every write,
    a merge patch refused (409) when its resourceVersion is not the current one."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.writes = 0

    def store(self, lease: dict[str, Any]) -> None:
        self.writes += 1
        lease["metadata"]["resourceVersion"] = str(self.writes)
        self.lease = lease

    def take(self, holder: str) -> None:
        """Another operator holds the Lease now (as `kubectl edit` could make it)."""
        assert self.lease is not None
        renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.lease["spec"].update(holderIdentity=holder, renewTime=renewed)
        self.store(self.lease)


class LeaseClient:
    """One candidate's lightkube AsyncClient on a LeaseServer: what LeaderElector calls (get, create,
    patch), and an empty list() and close() for the rest of the operator. `fault`, when set, runs
    before each call: a failure of this candidate's own (its network, its credentials)."""

    def __init__(self, server: LeaseServer) -> None:
        self.server = server
        self.fault: Callable[[], Awaitable[None]] | None = None
        self.renewed_at: list[float] = []
        """When each write of this client's was sent (time.monotonic)."""

    async def _call(self) -> float:
        sent = time.monotonic()
        if self.fault is not None:
            await self.fault()
        return sent

    async def get(self, _kind: type[Lease], _name: str, *, namespace: str) -> Lease:
        await self._call()
        if self.server.lease is None:
            raise _api_error(404)
        return cast(Lease, Lease.from_dict(copy.deepcopy(self.server.lease)))

    async def create(self, obj: Lease) -> None:
        sent = await self._call()
        if self.server.lease is not None:
            raise _api_error(409)
        self.server.store(obj.to_dict())
        self.renewed_at.append(sent)

    async def patch(self, _kind: type[Lease], _name: str, patch: dict[str, Any], **_: Any) -> None:
        sent = await self._call()
        lease = self.server.lease
        assert lease is not None
        if patch["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"]:
            raise _api_error(409)
        lease["spec"].update(patch["spec"])
        self.server.store(lease)
        self.renewed_at.append(sent)

    async def list(self, *_: Any, **__: Any) -> AsyncIterator[Any]:
        return
        yield

    async def close(self) -> None:
        pass


def _elector(
    server: LeaseServer, identity: str, *, duration_s: int = 1, skew: timedelta = timedelta(0)
) -> tuple[LeaderElector, LeaseClient]:
    client = LeaseClient(server)
    config = LeaseConfig(name="l", namespace="ns", identity=identity, duration_s=duration_s)
    elector = LeaderElector(cast(AsyncClient, client), config, clock=lambda: datetime.now(UTC) + skew)
    return elector, client


async def _hang() -> None:
    await asyncio.sleep(30)  # a partitioned API server: lightkube waits out its 10 s timeout, twice


async def _refused() -> None:
    raise httpx2.ConnectError("connection refused")


async def _eventually(check: Callable[[], bool], *, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("skew", [timedelta(hours=1), timedelta(hours=-1)], ids=["ahead", "behind"])
async def test_a_standby_judges_expiry_on_its_own_clock_not_the_leaders_renew_time(skew: timedelta) -> None:
    """B's wall clock is an hour off A's. Ahead, B read A's fresh renewTime as an hour old and took
    a healthy Lease; behind, it would wait an hour for a dead leader's. B goes by when it saw the
    Lease change, on its own monotonic clock."""
    server = LeaseServer()
    a, _ = _elector(server, "a")
    b, _ = _elector(server, "b", skew=skew)
    assert await a.try_acquire()
    assert not await b.try_acquire()  # just seen: valid for its 1 s from now
    await asyncio.sleep(0.6)
    assert await a.try_acquire()  # A renews
    await asyncio.sleep(0.6)
    assert not await b.try_acquire()  # 1.2 s since B first saw it, but it has changed since
    await asyncio.sleep(1.1)  # A renews no more
    assert await b.try_acquire()
    assert server.lease is not None
    assert server.lease["spec"]["holderIdentity"] == "b"


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("Exec aws returned 1: throttled"),
        OSError("Too many open files"),
        RuntimeError("a bug"),
    ],
    ids=["credential-plugin", "os-error", "bug"],
)
async def test_a_renewal_failing_in_any_way_is_retried_not_the_end_of_holding(error: Exception) -> None:
    """The fault is injected (a mock): the in-memory API has no credential plugin, file table or bug
    to fail with. lightkube raises ConfigError when an exec credential plugin fails (ExecAuth re-runs
    it on a 401); hold() ended on anything but ApiError and httpx2.HTTPError, without setting `lost`."""
    server = LeaseServer()
    a, a_client = _elector(server, "a")
    assert await a.try_acquire()

    async def once() -> None:
        a_client.fault = None
        raise error

    a_client.fault = once
    lost = asyncio.Event()
    holding = asyncio.create_task(a.hold(lost))
    try:
        await _eventually(lambda: len(a_client.renewed_at) >= 3 or holding.done())
        assert not holding.done()
        assert not lost.is_set()
        assert a_client.fault is None  # the renewal that failed was followed by good ones
    finally:
        holding.cancel()


@pytest.mark.parametrize(
    "error",
    [ConfigError("Exec aws returned 1: throttled"), OSError("Too many open files"), RuntimeError("a bug")],
    ids=["credential-plugin", "os-error", "bug"],
)
async def test_a_standby_retries_an_attempt_failing_in_any_way_and_says_it_did_not_reach(
    error: Exception,
) -> None:
    """The fault is injected (a mock), as in the renewal test above. acquire() ended on anything but
    ApiError and httpx2.HTTPError: the standby process exited and restarted instead of waiting."""
    server = LeaseServer()
    b, b_client = _elector(server, "b", duration_s=1)
    reached: list[bool] = []

    async def once() -> None:
        b_client.fault = None
        raise error

    b_client.fault = once
    await asyncio.wait_for(b.acquire(reached=reached.append), timeout=10)
    assert reached == [False, True]  # the failed attempt, then the one that took the Lease
    assert server.lease is not None
    assert server.lease["spec"]["holderIdentity"] == "b"


@pytest.mark.parametrize("fault", [_hang, _refused], ids=["hangs", "refused"])
async def test_the_leader_gives_up_at_its_renew_deadline_before_a_standby_can_take_over(
    fault: Callable[[], Awaitable[None]],
) -> None:
    """A loses the API after a renewal. It gives up two thirds of the lease (2 s) after that renewal
    was sent, its last attempt cut short there; B takes the Lease only after it has seen it unchanged
    for the whole lease. Before, A gave up after its attempt returned (10-20 s when it hangs), or a
    lease after hold() began rather than after its last renewal."""
    server = LeaseServer()
    a, a_client = _elector(server, "a", duration_s=2)
    b, _ = _elector(server, "b", duration_s=2)
    assert await a.try_acquire()
    lost = asyncio.Event()
    holding = asyncio.create_task(a.hold(lost))
    standby = asyncio.create_task(b.acquire())
    try:
        await _eventually(lambda: len(a_client.renewed_at) >= 3)
        a_client.fault = fault
        await asyncio.wait_for(lost.wait(), timeout=5)
        lost_after = time.monotonic() - a_client.renewed_at[-1]
        assert not standby.done()
        assert 2 * 2 / 3 - 0.05 <= lost_after < 2 * 2 / 3 + 0.3
        await asyncio.wait_for(standby, timeout=5)
    finally:
        holding.cancel()
        standby.cancel()


@pytest.fixture
def in_memory_operator(monkeypatch: pytest.MonkeyPatch) -> tuple[LeaseServer, dict[str, Any]]:
    """operator_main.run() on a LeaseServer, with kopf replaced (a mock: kopf needs a whole API
    server) by a stand-in that waits for its stop flag and notes, then, which of the leader-only
    writers (the autoscaler, the rebalancer) still run."""
    server = LeaseServer()
    seen: dict[str, Any] = {}

    async def kopf_operator(*, stop_flag: asyncio.Event, ready_flag: asyncio.Event, **_: Any) -> None:
        writers = [t for t in asyncio.all_tasks() if t.get_name() in ("autoscaler", "rebalancer")]
        ready_flag.set()
        seen["leading"] = True
        await stop_flag.wait()
        seen["running at stop"] = sorted(t.get_name() for t in writers if not t.done() and not t.cancelling())
        seen["writers"] = sorted(t.get_name() for t in writers)

    monkeypatch.setattr(operator_main, "kube_client", lambda _settings: LeaseClient(server))
    monkeypatch.setattr(kopf, "operator", kopf_operator)
    return server, seen


SETTINGS = OperatorSettings(
    namespaces=("ns",), lease_namespace="ns", lease_name="l", lease_seconds=1, identity="me"
)


async def test_on_losing_the_lease_the_writers_stop_before_kopf_is_told_to(
    in_memory_operator: tuple[LeaseServer, dict[str, Any]],
) -> None:
    """Before, only kopf was told to stop: the autoscaler and the rebalancer ran on until it returned."""
    server, seen = in_memory_operator
    running = asyncio.create_task(operator_main.run(SETTINGS))
    await _eventually(lambda: "leading" in seen)
    server.take("another-operator")
    assert await asyncio.wait_for(running, timeout=5) == 1
    assert seen["writers"] == ["autoscaler", "rebalancer"]
    assert seen["running at stop"] == []


async def test_holding_the_lease_ending_by_a_bug_stops_the_operator(
    in_memory_operator: tuple[LeaseServer, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hold() broken (a mock: it retries every failure of a renewal itself, so only a bug in it could
    end it so). Before, nothing watched its task: the operator led on without renewing."""
    _, seen = in_memory_operator

    async def broken_hold(_self: LeaderElector, _lost: asyncio.Event) -> None:
        raise RuntimeError("a bug in hold()")

    monkeypatch.setattr(LeaderElector, "hold", broken_hold)
    with caplog.at_level(logging.ERROR, logger="kubemoe.operator"):
        assert await asyncio.wait_for(operator_main.run(SETTINGS), timeout=5) == 1
    assert seen["running at stop"] == []
    assert "renewing the lease stopped" in caplog.text
