"""The router's backend choice (pure): round-robin, least-load, and prefix-hash — consistent hashing with
bounded load — sticky per prefix, bounded under skew, and moving few keys when a backend joins."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kubemoe_runtime.router.backends import dial_address, split_hostport
from kubemoe_runtime.router.policies import LeastLoad, PrefixHash, RoundRobin, make_policy


@dataclass
class B:
    address: str
    outstanding: int = 0


def pool(n: int) -> list[B]:
    return [B(f"10.0.0.{i}:8000") for i in range(n)]


def test_round_robin_cycles() -> None:
    backends, policy = pool(3), RoundRobin()
    assert [policy.choose(backends, key="") for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_load_picks_the_idlest_and_rotates_ties() -> None:
    backends, policy = pool(3), LeastLoad()
    backends[0].outstanding, backends[1].outstanding, backends[2].outstanding = 4, 1, 1
    assert {policy.choose(backends, key="") for _ in range(4)} == {1, 2}
    backends[2].outstanding = 0
    assert policy.choose(backends, key="") == 2


def test_prefix_hash_is_sticky_and_spreads_keys() -> None:
    backends, policy = pool(4), PrefixHash()
    keys = [f"system prompt {i}" for i in range(400)]
    first = [policy.choose(backends, key=k) for k in keys]
    assert [policy.choose(backends, key=k) for k in keys] == first  # same prefix, same backend
    counts = [first.count(i) for i in range(4)]
    assert min(counts) > 40, counts  # 64 virtual nodes each: no backend starves


def test_prefix_hash_bounds_the_load_of_a_hot_prefix() -> None:
    backends, policy = pool(4), PrefixHash(eps=0.25)
    for _ in range(40):  # one hot prefix: the caller keeps every request outstanding
        backends[policy.choose(backends, key="hot")].outstanding += 1
    total = sum(b.outstanding for b in backends)
    assert max(b.outstanding for b in backends) <= policy.capacity(backends) <= 1.25 * total / 4 + 1
    assert sum(b.outstanding > 0 for b in backends) == 4  # the overflow walked the ring


def test_prefix_hash_moves_few_keys_when_a_backend_joins() -> None:
    keys = [f"k{i}" for i in range(1000)]
    policy = PrefixHash()
    before = {k: pool(4)[policy.choose(pool(4), key=k)].address for k in keys}
    after = {k: pool(5)[policy.choose(pool(5), key=k)].address for k in keys}
    moved = sum(before[k] != after[k] for k in keys)
    assert 0 < moved < 350  # about 1/5 ideally; modulo hashing would move about 4/5
    assert all(after[k] == "10.0.0.4:8000" for k in keys if before[k] != after[k])


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_host_port_parsing() -> None:
    assert split_hostport("tiny-moe-decode.ns.svc:8000") == ("tiny-moe-decode.ns.svc", 8000)
    assert split_hostport("[::1]:8000") == ("::1", 8000)
    assert dial_address("::1", 8000) == "[::1]:8000"
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_hostport("no-port")


async def test_backends_come_from_dns_and_follow_it() -> None:
    from kubemoe_runtime.router.backends import Backends
    from kubemoe_runtime.router.metrics import RouterMetrics

    backends = Backends({"worker": ["localhost:9", "127.0.0.2:9"]}, metrics=RouterMetrics())
    try:
        await backends.refresh()
        addresses = set(backends.pool("worker").backends)
        assert {"127.0.0.1:9", "127.0.0.2:9"} <= addresses  # localhost resolved; a literal kept as is
        assert not backends.pool("worker").healthy()  # nothing listens on port 9: never in rotation
        backends.pool("worker").services = [("127.0.0.3", 9)]  # the Service's answers changed
        await backends.refresh()
        assert set(backends.pool("worker").backends) == {"127.0.0.3:9"}
    finally:
        await backends.stop()


async def test_a_backend_that_leaves_takes_its_series_along() -> None:
    """Pods come and go (each its own IP): a departed backend's series go from every per-backend metric,
    and a request to it (or a probe of it) still under way when it left brings none back."""
    from kubemoe_runtime.router.backends import Backends
    from kubemoe_runtime.router.metrics import RouterMetrics
    from tests.runtime.routing import sample

    metrics = RouterMetrics()
    backends = Backends({"worker": ["127.0.0.2:9", "127.0.0.3:9"]}, metrics=metrics)
    try:
        await backends.refresh()
        gone = backends.pool("worker").backends["127.0.0.2:9"]
        for kind in ("connect", "read", "stream read"):
            backends.eject(gone, reason=kind)
        text = metrics.render().decode()
        assert sample(text, "kubemoe_router_backend_errors_total", backend="127.0.0.2:9", kind="read") == 1
        assert sample(text, "kubemoe_router_backend_healthy", backend="127.0.0.2:9") == 0
        backends.pool("worker").services = [("127.0.0.3", 9)]  # 127.0.0.2 left the Service
        await backends.refresh()
        backends.eject(gone, reason="read")  # a request to it that failed after it left
        await backends.probe(gone)  # a probe of it under way when it left
        text = metrics.render().decode()
        assert "127.0.0.2:9" not in text
        backends.eject(backends.pool("worker").backends["127.0.0.3:9"], reason="connect")
        text = metrics.render().decode()
        assert sample(text, "kubemoe_router_backend_errors_total", backend="127.0.0.3:9", kind="connect") == 1
        assert sample(text, "kubemoe_router_backend_healthy", backend="127.0.0.3:9") == 0
    finally:
        await backends.stop()
