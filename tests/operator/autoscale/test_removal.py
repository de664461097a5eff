"""Choosing the group a scale-down removes: each one-pod group's load (requests running + waiting, from
the runtime's own metrics, served over HTTP) becomes its pod's deletion cost before the change."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx2
import pytest

from kubemoe_operator.autoscale.removal import DELETION_COST, LeastLoaded, load_of
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.pods import Leader
from kubemoe_operator.local.layout import free_port
from tests.operator.autoscale.load_pages import load_pages

SEL = RoleSelector(namespace="ns", deployment="ds", role="decode")


def _pod(name: str, *, owner: str = "ReplicaSet", cost: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "ownerReferences": [{"kind": owner, "name": "x", "controller": True}],
    }
    if cost is not None:
        meta["annotations"] = {DELETION_COST: cost}
    return {"metadata": meta}


class Annotations:
    """Records the patches; fails on the pods named in `refuse`."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.patched: dict[str, Mapping[str, str]] = {}
        self.refuse = refuse

    async def annotate_pod(self, *, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        assert namespace == "ns"
        if name in self.refuse:
            raise RuntimeError("403 forbidden")
        self.patched[name] = dict(annotations)


@pytest.fixture
def pages() -> Iterator[list[str]]:
    """Three runtime pods' /metrics, with loads (requests running + waiting) 5, 0 and 12."""
    with load_pages([5, 0, 12], deployment="ds") as urls:
        yield urls


async def test_each_group_leaders_cost_is_its_load(pages: list[str]) -> None:
    pods = [_pod("a"), _pod("b", cost="0"), _pod("c", cost="7")]
    dead = Leader(pod=_pod("gone"), url=f"http://127.0.0.1:{free_port()}/metrics")
    lws = Leader(pod=_pod("lws-leader", owner="StatefulSet"), url=pages[0])

    async def leaders(sel: RoleSelector) -> list[Leader]:
        assert sel == SEL
        return [*(Leader(pod=p, url=u) for p, u in zip(pods, pages, strict=True)), dead, lws]

    kube = Annotations()
    async with httpx2.AsyncClient() as client:
        costs = await LeastLoaded(kube=kube, leaders=leaders, client=client).mark(SEL)
    assert costs == {"a": 5, "b": 0, "c": 12}
    # b already had cost 0: not patched again; the dead pod keeps what it had; LWS pods are left alone.
    assert kube.patched == {"a": {DELETION_COST: "5"}, "c": {DELETION_COST: "12"}}


async def test_a_refused_patch_leaves_the_others_marked(pages: list[str]) -> None:
    async def leaders(_: RoleSelector) -> list[Leader]:
        return [Leader(pod=_pod(n), url=u) for n, u in zip("abc", pages, strict=True)]

    kube = Annotations(refuse=frozenset({"a"}))
    async with httpx2.AsyncClient() as client:
        costs = await LeastLoaded(kube=kube, leaders=leaders, client=client).mark(SEL)
    assert costs == {"b": 0, "c": 12}
    assert set(kube.patched) == {"b", "c"}


@pytest.mark.parametrize("value", ["-1", "NaN", "+Inf"])
def test_a_page_with_an_impossible_load_is_refused(value: str) -> None:
    page = f'kubemoe_requests_running{{deployment="ds",role="decode",group="0",rank="0"}} {value}\n'
    with pytest.raises(ValueError, match="kubemoe_requests_running"):
        load_of(page, SEL)


def test_only_the_roles_own_series_count() -> None:
    page = (
        'kubemoe_requests_running{deployment="other",role="decode",group="0",rank="0"} 9\n'
        'kubemoe_requests_running{deployment="ds",role="prefill",group="0",rank="0"} 7\n'
        'kubemoe_requests_waiting{deployment="ds",role="decode",group="0",rank="0"} 2\n'
        'kubemoe_requests_running{deployment="ds",role="decode",group="0",rank="0"} 1\n'
    )
    assert load_of(page, SEL) == 3.0
