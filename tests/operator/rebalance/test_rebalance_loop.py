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
from kubemoe_operator.rebalance.failures import MAX_PLACEMENT_TRIES
from kubemoe_operator.rebalance.loop import EVENT_PLACEMENT_FAILED, EVENT_REBALANCED, Rebalancer
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


OOM = "rank 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def _failures(kube: MemoryKube) -> list[dict[str, Any]]:
    return [e for e in kube.events if e["reason"] == EVENT_PLACEMENT_FAILED]


async def test_a_generation_a_group_gives_up_is_retried_a_few_times_then_left_saying_why() -> None:
    # The group aborted generation 1 (its load document: generation 0, nothing pending, an error).
    # Before, the loop sent it generation 1 again at every check, forever, each try reading experts
    # and taking staging memory again, and status only said "bringing 1 group(s) to ...".
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2, fail_with=OOM)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            assert (await scaler.evaluate(_body(), force=True))["decode"].applied
            assert (groups[0].generation, groups[1].generation) == (1, 0)
            for attempt in (1, 2):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert not check.applied
                message = check.status.message
                assert "bringing 1 group(s) to placement generation 1" in message
                assert f"placement generation 1 failed (try {attempt} of {MAX_PLACEMENT_TRIES})" in message
                assert "md-decode-1: generation 1 was not applied" in message
                assert OOM in message
                assert len(groups[1].posted) == 1 + attempt  # sent again
                assert len(_failures(kube)) == attempt
            status = kube.statuses[("ns", "tiny-moe")]["experts"]["decode"]
            assert OOM in status["message"]
            (warning, *_) = _failures(kube)
            assert warning["type"] == "Warning"
            assert "decode: 1 group(s) did not apply it" in warning["message"]
            assert OOM in warning["message"]
            # the third failure: given up, and the group is sent it no more; the group that runs it
            # goes back to what the other runs (before, the role stayed split, and was rebalanced no
            # more until the spec changed or the operator restarted)
            before = groups[1].slots
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "placement generation 1 failed 3 times, not sent again" in check.status.message
            assert (
                "the 1 group(s) that ran it are sent back to the placement the others run (generation 0)"
                in check.status.message
            )
            assert OOM in check.status.message
            assert len(groups[1].posted) == 3
            assert len(_failures(kube)) == 3
            assert "not sent again" in _failures(kube)[-1]["message"]
            assert groups[0].posted[-1]["generation"] == 0
            assert (groups[0].generation, groups[0].slots) == (0, before)
            data = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")["data"]
            assert json.loads(data[_key(slots=5)])["generation"] == 0  # what a pod starting later loads
            assert OOM in json.loads(data["rebalance.json"])["notApplied"]
            for _ in range(3):  # one placement again: rebalanced on, never to the one given up
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert "failed 3 times, not sent again" in check.status.message
                assert not check.applied
            assert len(groups[1].posted) == 3
            assert len(_failures(kube)) == 3
            assert len(groups[0].posted) == 2
            # a spec change (metadata.generation): tried again, under a number the group has not given
            # up (its error still names generation 1)
            changed = _body()
            changed["metadata"]["generation"] = 2
            check = (await scaler.evaluate(changed, force=True))["decode"]
            assert check.applied
            assert [g.posted[-1]["generation"] for g in groups] == [2, 2]
            assert len(groups[1].posted) == 4


async def test_a_placement_every_group_gave_up_goes_back_and_is_not_chosen_again() -> None:
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2, fail_with=OOM) for _ in range(2)]
    key = _key(slots=5)
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            assert (await scaler.evaluate(_body(), force=True))["decode"].applied
            failed = groups[0].posted[0]
            for _ in range(MAX_PLACEMENT_TRIES):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert [len(g.posted) for g in groups] == [3, 3]
            assert "placement generation 1 failed 3 times, not sent again" in check.status.message
            assert OOM in check.status.message
            assert check.status.generation == 0
            # the ConfigMap names what every group still runs (a pod starting later loads that), and
            # its record of the rebalance says it was not applied
            data = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")["data"]
            placement = json.loads(data[key])
            assert placement["generation"] == 0
            assert [layer["slots"] for layer in placement["layers"]] == groups[0].slots
            record = json.loads(data["rebalance.json"])
            assert record["generation"] == 1
            assert OOM in record["notApplied"]
            # the same load chooses the same placement: not sent again
            for _ in range(2):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert not check.applied
                assert "not sent again" in check.status.message
            assert [len(g.posted) for g in groups] == [3, 3]
            assert len(_failures(kube)) == 3
            # another load, another placement: sent, under a generation number of its own
            for g in groups:
                g.fail_with = None
                g.tokens = [list(reversed(layer)) for layer in HOT]
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert check.applied
            new = groups[0].posted[-1]
            assert new["layers"] != failed["layers"]
            assert new["generation"] == 2
            assert [g.generation for g in groups] == [2, 2]
            assert "failed" not in check.status.message
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "failed" not in check.status.message


REFUSED = "layers[0].slots: 10 slots, this group runs 2 ranks x 4 slots"


async def test_a_placement_a_group_refuses_counts_as_a_failed_try_and_is_given_up() -> None:
    # A 400 to the POST (the document does not fit the group) is the same answer every time. Before, the
    # loop logged it and sent the placement again at every check, forever, and nothing said why.
    kube = MemoryKube()
    groups = [
        Group(tokens=HOT, ranks=2, redundant=2),
        Group(tokens=HOT, ranks=2, redundant=2, refuse=REFUSED),
    ]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert check.applied
            assert f"placement generation 1 failed (try 1 of {MAX_PLACEMENT_TRIES})" in check.status.message
            assert f"md-decode-1 answered 400 to placement POST: {REFUSED}" in check.status.message
            (warning,) = _failures(kube)
            assert warning["type"] == "Warning"
            assert REFUSED in warning["message"]
            assert (groups[0].generation, groups[1].generation) == (1, 0)
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "bringing 1 group(s) to placement generation 1" in check.status.message
            assert f"(try 2 of {MAX_PLACEMENT_TRIES})" in check.status.message
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "placement generation 1 failed 3 times, not sent again" in check.status.message
            assert len(groups[1].posted) == MAX_PLACEMENT_TRIES
            assert len(_failures(kube)) == MAX_PLACEMENT_TRIES
            # given up: the group that took it goes back to what the other runs, and it is sent no more
            before = groups[1].slots
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "sent back to the placement the others run (generation 0)" in check.status.message
            assert (groups[0].generation, groups[0].slots) == (0, before)
            for _ in range(2):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert not check.applied
                assert "not sent again" in check.status.message
            assert len(groups[1].posted) == MAX_PLACEMENT_TRIES
            assert len(_failures(kube)) == MAX_PLACEMENT_TRIES


async def test_groups_that_give_up_the_placement_they_are_sent_back_to_are_left_split() -> None:
    # Group 0 applies generation 1, group 1 gives it up; when 1 is given up, group 0 is sent back to
    # generation 0 and gives that up as well. Before, the loop's one memory of a failure per role then
    # forgot generation 1, and after three tries sent group 1 to it again: the role swung between two
    # placements that fail, every try reading experts, forever.
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2, fail_with=OOM)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            assert (await scaler.evaluate(_body(), force=True))["decode"].applied
            for _ in range(MAX_PLACEMENT_TRIES - 1):
                await scaler.evaluate(_body(), force=True)
            groups[0].fail_with = "rank 0: WeightLoadError: shard 3 is gone"
            check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "sent back to the placement the others run (generation 0)" in check.status.message
            assert groups[0].generation == 1
            assert groups[0].error is not None
            assert groups[0].error.startswith("generation 0 was not applied")
            for _ in range(MAX_PLACEMENT_TRIES):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
            assert "placement generation 0 failed 3 times" in check.status.message
            assert "which was given up as well: left so" in check.status.message
            posted = [len(g.posted) for g in groups]
            assert posted == [1 + MAX_PLACEMENT_TRIES, MAX_PLACEMENT_TRIES]
            for _ in range(3):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert not check.applied
                assert "left so until another placement is chosen" in check.status.message
            assert [len(g.posted) for g in groups] == posted  # neither is sent anything more
            assert [g.generation for g in groups] == [1, 0]
            assert len(_failures(kube)) == 2 * MAX_PLACEMENT_TRIES


async def test_after_a_restart_a_new_placement_takes_a_number_no_group_gave_up() -> None:
    """The loop's memory of a placement given up goes with the operator's process; the groups' errors
    stay. A new operator's first placement is numbered above the generation they name: were it numbered
    1 again, a group not sent it yet would read as having given it up already."""
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2, fail_with=OOM) for _ in range(2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            await scaler.evaluate(_body(), force=True)
            for _ in range(MAX_PLACEMENT_TRIES):
                await scaler.evaluate(_body(), force=True)
            assert all(g.error is not None and g.error.startswith("generation 1 was not") for g in groups)
            assert [g.generation for g in groups] == [0, 0]
            for g in groups:
                g.fail_with = None
            restarted = _scaler(kube, leaders, client)
            check = (await restarted.evaluate(_body(), force=True))["decode"]
    assert check.applied
    assert [g.posted[-1]["generation"] for g in groups] == [2, 2]
    assert [g.generation for g in groups] == [2, 2]


async def test_an_error_about_another_generation_is_not_a_failure_of_this_one() -> None:
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            scaler = _scaler(kube, leaders, client)
            await scaler.evaluate(_body(), force=True)
            # restarted on generation 0, still showing an older generation's error: it is caught up
            groups[1].generation = 0
            groups[1].slots = [[*range(8), 0, 4] for _ in HOT]
            groups[1].answer = 409
            groups[1].error = "generation 7 was not applied (generation 0 stays): rank 0: WeightLoadError: x"
            for _ in range(MAX_PLACEMENT_TRIES + 1):
                check = (await scaler.evaluate(_body(), force=True))["decode"]
                assert check.status.message == "bringing 1 group(s) to placement generation 1"
    assert len(groups[1].posted) == MAX_PLACEMENT_TRIES + 2
    assert _failures(kube) == []


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


def _recording(kube: MemoryKube) -> list[dict[str, Any]]:
    """The ConfigMaps the loop applies, as it sends them (server-side apply drops the keys a manager
    stops naming; MemoryKube merges, so the body is what to look at)."""
    applied: list[dict[str, Any]] = []
    apply = kube.apply

    async def recorded(obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if obj["kind"] == "ConfigMap":
            applied.append(obj)
        return await apply(obj, **kw)

    kube.apply = recorded  # type: ignore[method-assign]
    return applied


async def test_the_last_rebalance_of_an_old_layout_goes_with_its_placement() -> None:
    # `kubectl moe experts` reads rebalance.json against the placement of the layout the groups run:
    # an old layout's record failed it ("not a multiple of the R ranks") or showed the old layout's
    # numbers as BEFORE and PREDICTED.
    kube = MemoryKube()
    applied = _recording(kube)
    old = [Group(tokens=HOT, ranks=2, redundant=0)]
    async with httpx2.AsyncClient() as client:
        with serving(old) as leaders:
            assert (await _scaler(kube, leaders, client).evaluate(_body(redundant=0), force=True))[
                "decode"
            ].applied
    record = json.loads(applied[-1]["data"]["rebalance.json"])
    assert (record["ranks"], record["slotsPerRank"], record["placementKey"]) == (2, 4, _key(slots=4))
    even = [[100] * 8, [100] * 8]
    new = [Group(tokens=even, ranks=2, redundant=2)]
    async with httpx2.AsyncClient() as client:
        with serving(new) as leaders:
            check = (await _scaler(kube, leaders, client).evaluate(_body(redundant=2), force=True))["decode"]
    assert not check.applied
    body = applied[-1]["data"]
    assert _key(slots=5) in body
    assert _key(slots=4) not in body
    assert "rebalance.json" not in body
    assert "observed.json" in body


async def test_a_record_from_before_records_named_their_layout() -> None:
    """One written by an earlier operator (no placementKey) is kept while the layout stays and its
    slots fit it; dropped when they do not, or when the layout is changing."""
    legacy = {"generation": 1, "layers": [1, 2], "slots": [[0] * 10] * 2, "previousSlots": [[0] * 10] * 2}
    even = [[100] * 8, [100] * 8]
    for slots, other_layout, kept in ((10, False, True), (8, False, False), (10, True, False)):
        kube = MemoryKube()
        doc = {**legacy, "slots": [[0] * slots] * 2, "previousSlots": [[0] * slots] * 2}
        data = {"rebalance.json": json.dumps(doc)}
        if other_layout:
            data[placement_key(ranks=5, slots_per_rank=2, source=_body()["spec"]["model"]["source"])] = "{}"
        kube.objects[("ConfigMap", "ns", "tiny-moe-decode-experts")] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "tiny-moe-decode-experts", "namespace": "ns"},
            "data": data,
        }
        applied = _recording(kube)
        async with httpx2.AsyncClient() as client:
            with serving([Group(tokens=even, ranks=2, redundant=2)]) as leaders:
                await _scaler(kube, leaders, client).evaluate(_body(redundant=2), force=True)
        assert ("rebalance.json" in applied[-1]["data"]) is kept, (slots, other_layout)


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
