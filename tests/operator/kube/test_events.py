"""Events aggregated as client-go's EventCorrelator does (#20): the pure decision (kube/events.py), then
the real Kube.post_event against the in-memory API (MemoryKube: only the POST and PATCH are in memory)."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.gen.rbac import CLUSTER_RULES
from kubemoe_operator.kube.client import event_body
from kubemoe_operator.kube.events import COMBINED, CreateEvent, EventCorrelator, PatchEvent
from tests.operator.reconcile.memory_kube import MemoryKube

MD = {
    "apiVersion": "kubemoe.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "ds", "namespace": "prod", "uid": "u-1"},
}


def scaled(
    message: str, *, now: str = "2026-01-01T00:00:00Z", involved: dict[str, Any] = MD
) -> dict[str, Any]:
    return event_body(
        involved=involved,
        reason="Scaled",
        message=message,
        warning=False,
        component="kubemoe-autoscaler",
        now=now,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def created(c: EventCorrelator, event: dict[str, Any], name: str) -> CreateEvent:
    action = c.observe(event)
    assert isinstance(action, CreateEvent)
    c.created(action.key, namespace="prod", name=name)
    return action


def patched(c: EventCorrelator, event: dict[str, Any]) -> PatchEvent:
    action = c.observe(event)
    assert isinstance(action, PatchEvent)
    c.patched(action)
    return action


def test_the_same_event_again_patches_the_count_and_last_timestamp_of_the_first() -> None:
    clock = Clock()
    c = EventCorrelator(clock=clock)
    first = created(c, scaled("decode: 2 -> 3"), "ds.a")
    assert first.body["count"] == 1
    clock.now += 300
    again = patched(c, scaled("decode: 2 -> 3", now="2026-01-01T00:05:00Z"))
    assert (again.namespace, again.name) == ("prod", "ds.a")
    assert again.patch == {"count": 2, "lastTimestamp": "2026-01-01T00:05:00Z", "message": "decode: 2 -> 3"}
    clock.now += 599  # the window runs from the last sighting
    assert patched(c, scaled("decode: 2 -> 3")).patch["count"] == 3


def test_after_the_window_or_when_forgotten_a_new_event_is_created() -> None:
    clock = Clock()
    c = EventCorrelator(clock=clock)
    key = created(c, scaled("decode: 2 -> 3"), "ds.a").key
    clock.now += 601
    created(c, scaled("decode: 2 -> 3"), "ds.b")
    patched(c, scaled("decode: 2 -> 3"))
    c.forget(key)
    assert isinstance(c.observe(scaled("decode: 2 -> 3")), CreateEvent)


def test_another_object_reason_or_message_is_another_event() -> None:
    c = EventCorrelator(clock=Clock())
    created(c, scaled("decode: 2 -> 3"), "ds.a")
    other = {**MD, "metadata": {"name": "ds", "namespace": "prod", "uid": "u-2"}}  # deleted and made again
    assert isinstance(c.observe(scaled("decode: 2 -> 3", involved=other)), CreateEvent)
    assert isinstance(c.observe(scaled("decode: 3 -> 4")), CreateEvent)
    warning = {**scaled("decode: 2 -> 3"), "reason": "ScaleFailed"}
    assert isinstance(c.observe(warning), CreateEvent)


def test_the_tenth_similar_message_is_combined_and_the_rest_patch_it() -> None:
    clock = Clock()
    c = EventCorrelator(clock=clock)
    for i in range(9):
        created(c, scaled(f"decode: itl-p90 0.0{i} -> {i} groups"), f"ds.{i}")
        clock.now += 10
    combined = created(c, scaled("decode: itl-p90 0.09 -> 9 groups"), "ds.combined")
    assert combined.body["message"] == COMBINED + "decode: itl-p90 0.09 -> 9 groups"
    later = patched(c, scaled("decode: itl-p90 0.11 -> 4 groups", now="2026-01-01T00:02:00Z"))
    assert later.name == "ds.combined"
    assert later.patch == {
        "count": 2,
        "lastTimestamp": "2026-01-01T00:02:00Z",
        "message": COMBINED + "decode: itl-p90 0.11 -> 4 groups",
    }
    clock.now += 601  # quiet for the window: messages are told apart again
    assert c.observe(scaled("decode: itl-p90 0.12 -> 5 groups")).key[-1] != ""


def test_memory_is_bounded_least_recently_seen_first() -> None:
    c = EventCorrelator(clock=Clock(), size=2)
    created(c, scaled("a"), "ds.a")
    created(c, scaled("b"), "ds.b")
    patched(c, scaled("a"))  # a seen again: b is now the oldest
    created(c, scaled("c"), "ds.c")
    assert isinstance(c.observe(scaled("a")), PatchEvent)
    assert isinstance(c.observe(scaled("b")), CreateEvent)


async def test_a_busy_autoscaler_leaves_a_few_events_whose_counts_add_up() -> None:
    kube = MemoryKube()
    for i in range(40):  # every decision's message differs (readings), a few repeat
        await kube.post_event(scaled(f"decode: queue-depth {i % 25} -> {2 + i % 3} groups"))
    assert len(kube.events) == 10  # nine told apart, then one combined
    assert sum(e["count"] for e in kube.events) == 40
    (combined,) = [e for e in kube.events if e["message"].startswith(COMBINED)]
    assert combined["count"] == 31
    assert combined["firstTimestamp"] == combined["lastTimestamp"] == "2026-01-01T00:00:00Z"
    assert kube.writes["create"] == 10
    assert kube.writes["patch"] == 30
    assert all(e["metadata"]["name"].startswith("ds.") for e in kube.events)


async def test_an_event_gone_from_the_api_is_created_again() -> None:
    kube = MemoryKube()
    await kube.post_event(scaled("decode: 2 -> 3"))
    await kube.post_event(scaled("decode: 2 -> 3", now="2026-01-01T00:01:00Z"))
    ((first),) = kube.events
    assert first["count"] == 2
    assert first["lastTimestamp"] == "2026-01-01T00:01:00Z"
    assert first["firstTimestamp"] == "2026-01-01T00:00:00Z"
    kube.events.clear()  # the API server's event TTL ran out
    await kube.post_event(scaled("decode: 2 -> 3", now="2026-01-01T00:02:00Z"))
    (again,) = kube.events
    assert again["count"] == 1
    assert again["metadata"]["name"] != first["metadata"]["name"]
    await kube.post_event(scaled("decode: 2 -> 3", now="2026-01-01T00:03:00Z"))
    assert [e["count"] for e in kube.events] == [2]


def test_the_operators_rbac_allows_both_writes() -> None:
    verbs = {
        v for r in CLUSTER_RULES if "events" in r["resources"] and "" in r["apiGroups"] for v in r["verbs"]
    }
    assert verbs == {"create", "patch", "list"}  # list: the controllers' FailedCreate Events
