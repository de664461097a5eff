"""The rebalancer's loop (rebalance/loop.py) against stand-in group leaders (groups.py) and MemoryKube."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import yaml

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.kube.pods import Leader
from kubemoe_operator.plan.experts import default_slots, imbalance
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.rebalance.loop import EVENT_REBALANCED, Rebalancer
from kubemoe_operator.render.experts import expert_volumes, placement_key
from tests.operator.rebalance.groups import Group, serving
from tests.operator.reconcile.memory_kube import MemoryKube

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
HOT = [[900, 20, 20, 20, 20, 20, 20, 20], [300, 300, 10, 10, 10, 10, 10, 10]]


def _body(redundant: int = 2, min_improvement: float = 0.05) -> dict[str, Any]:
    md: dict[str, Any] = yaml.safe_load((EXAMPLES / "tiny-moe.yaml").read_text())
    md["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    md["spec"]["experts"] = {"redundant": redundant, "rebalance": {"minImprovement": min_improvement}}
    return md


def _key(*, slots: int) -> str:
    return placement_key(ranks=2, slots_per_rank=slots, source=_body()["spec"]["model"]["source"])


def _mounted_key(md: dict[str, Any], role: str = "decode") -> str:
    """The ConfigMap key the role's pods are rendered to load."""
    parsed = parse_manifest(md)
    (plan_role,) = [r for r in plan_manifest(parsed).roles if r.role == role]
    owner = md["metadata"]["name"]
    (volume,), _ = expert_volumes(owner=owner, spec=parsed.spec, role=plan_role)
    ((item),) = volume["configMap"]["items"]
    assert item["path"] == "placement.json"
    return str(item["key"])


def _scaler(kube: MemoryKube, leaders: list[Leader], client: httpx2.AsyncClient) -> Rebalancer:
    async def listed(namespace: str, deployment: str, role: str) -> list[Leader]:
        assert (namespace, deployment) == ("ns", "tiny-moe")
        return leaders if role == "decode" else []

    return Rebalancer(kube=kube, client=client, leaders=listed)


async def test_a_skewed_role_is_rebalanced_everywhere_and_recorded() -> None:
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            checks = await _scaler(kube, leaders, client).evaluate(_body(), force=True)
    decode = checks["decode"]
    assert decode.applied
    # every group got the same placement, generation 1, in the contract's shape
    assert [len(g.posted) for g in groups] == [1, 1]
    placement = groups[0].posted[0]
    assert placement == groups[1].posted[0]
    assert placement["generation"] == 1
    assert (placement["ranks"], placement["slotsPerRank"]) == (2, 5)
    assert [layer["layer"] for layer in placement["layers"]] == [1, 2]
    summed = [[2 * v for v in layer] for layer in HOT]
    before = default_slots(8, 2, 2)
    for layer, new in zip(summed, placement["layers"], strict=True):
        assert imbalance(layer, new["slots"], ranks=2) < imbalance(layer, before, ranks=2)
    # the ConfigMap: what a pod starting later loads, and the record kubectl moe experts reads
    cm = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")
    assert json.loads(cm["data"][_key(slots=5)]) == placement
    record = json.loads(cm["data"]["rebalance.json"])
    assert record["tokens"] == summed
    assert record["slots"] == [layer["slots"] for layer in placement["layers"]]
    assert all(a > b for a, b in zip(record["imbalanceBefore"], record["imbalancePredicted"], strict=True))
    assert json.loads(cm["data"]["observed.json"])["tokens"] == summed
    assert LABEL_DEPLOYMENT not in cm["metadata"]["labels"]  # the reconciler must not prune it
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # status and an Event
    status = kube.statuses[("ns", "tiny-moe")]["experts"]["decode"]
    assert status["generation"] == 1
    assert status["predictedImbalance"] < status["imbalance"]
    assert "lastRebalanceTime" in status
    (event,) = kube.events
    assert event["reason"] == EVENT_REBALANCED
    assert "generation 1" in event["message"]


async def test_a_group_behind_the_configmap_is_brought_up_before_anything_new() -> None:
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            await scaler.evaluate(_body(), force=True)
            target = groups[0].posted[0]
            groups[1].generation = 0  # restarted before its mounted file had generation 1
            groups[1].slots = [[*range(8), 0, 4] for _ in HOT]
            check = (await scaler.evaluate(_body(), force=True))["decode"]
    assert not check.applied
    assert "bringing 1 group(s) to placement generation 1" in check.status.message
    assert groups[1].posted[-1] == target
    assert len(groups[0].posted) == 1  # the group already there is left alone
    assert len(kube.events) == 1


async def test_an_even_load_or_a_small_gain_moves_nothing_but_is_observed() -> None:
    kube = MemoryKube()
    even = [[100] * 8, [100] * 8]
    groups = [Group(tokens=even, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            check = (await _scaler(kube, leaders, client).evaluate(_body(), force=True))["decode"]
    assert not check.applied
    assert groups[0].posted == []
    cm = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")
    assert "rebalance.json" not in cm["data"]
    assert json.loads(cm["data"][_key(slots=5)])["generation"] == 0
    assert kube.statuses[("ns", "tiny-moe")]["experts"]["decode"]["generation"] == 0
    assert kube.events == []


async def test_pods_on_another_redundant_count_wait_for_the_rollout() -> None:
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=0)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            check = (await _scaler(kube, leaders, client).evaluate(_body(redundant=2), force=True))["decode"]
    assert not check.applied
    assert "waiting for the rollout" in check.status.message
    assert groups[0].posted == []


async def test_a_new_layout_starts_from_the_default_and_gets_its_own_placement() -> None:
    # spec.experts.redundant 0 -> 2: the placement written for the old layout (4 slots a rank) must
    # not reach the new pods (5 slots a rank), which refused it and crash-looped, while the rollout
    # waited on them; they read their own layout's key, which is written once every group runs it.
    kube = MemoryKube()
    even = [[100] * 8, [100] * 8]
    old = [Group(tokens=even, ranks=2, redundant=0), Group(tokens=even, ranks=2, redundant=0)]
    async with httpx2.AsyncClient() as client:
        with serving(old) as leaders:
            await _scaler(kube, leaders, client).evaluate(_body(redundant=0), force=True)
    cm = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")
    assert _mounted_key(_body(redundant=0)) == _key(slots=4)
    assert json.loads(cm["data"][_key(slots=4)])["slotsPerRank"] == 4
    new_key = _mounted_key(_body(redundant=2))
    assert new_key == _key(slots=5) != _key(slots=4)
    mixed = [old[0], Group(tokens=HOT, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(mixed) as leaders:
            check = (await _scaler(kube, leaders, client).evaluate(_body(redundant=2), force=True))["decode"]
    assert "different layouts" in check.status.message
    assert "waiting for the rollout" in check.status.message
    assert [g.posted for g in mixed] == [[], []]
    assert new_key not in kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")["data"]  # default, for now
    rolled = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2)]
    applied: list[dict[str, Any]] = []
    apply = kube.apply

    async def recorded(obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        applied.append(obj)
        return await apply(obj, **kw)

    kube.apply = recorded  # type: ignore[method-assign]
    async with httpx2.AsyncClient() as client:
        with serving(rolled) as leaders:
            check = (await _scaler(kube, leaders, client).evaluate(_body(redundant=2), force=True))["decode"]
    assert check.applied
    data = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")["data"]
    assert json.loads(data[new_key])["slotsPerRank"] == 5
    # the old layout's is left out of the apply: server-side apply removes the fields a manager
    # stops naming (MemoryKube merges, so the body is what to look at)
    (body,) = [o for o in applied if o["kind"] == "ConfigMap"]
    assert new_key in body["data"]
    assert _key(slots=4) not in body["data"]


async def test_a_new_model_gets_a_key_of_its_own() -> None:
    md = _body()
    other = _body()
    other["spec"]["model"]["source"] = md["spec"]["model"]["source"] + "-v2"
    assert _mounted_key(md) != _mounted_key(other)


async def test_a_role_is_first_checked_one_interval_after_the_operator_starts() -> None:
    kube = MemoryKube()
    now = [1000.0]
    groups = [Group(tokens=HOT, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            scaler.clock = lambda: now[0]
            assert await scaler.evaluate(_body()) == {}
            now[0] += 599
            assert await scaler.evaluate(_body()) == {}
            now[0] += 1  # spec.experts.rebalance.intervalSeconds defaults to 600
            assert (await scaler.evaluate(_body()))["decode"].applied
