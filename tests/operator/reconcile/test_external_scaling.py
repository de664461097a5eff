"""autoscaling.mode external against the in-memory API, which keeps who owns a workload's spec.replicas
the way server-side apply does (memory_kube.py): the workload is created with the spec's count and
handed over; a scaler's count is never put back and is what status reports; a role switched from
operator mode keeps the count it runs (not the default 1); switched back, the operator takes it.
e2e/test_external_scaling.py runs the same against a real kube-apiserver."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.kube.client import REPLICAS_HANDOVER_MANAGER, RetryableError, owns_replicas
from tests.operator.helpers import REPO
from tests.operator.reconcile.memory_kube import MemoryKube
from tests.operator.reconcile.test_reconcile import NS, SPEC, conditions, reasons, run

OPERATOR = "kubemoe-operator"
DECODE = ("LeaderWorkerSet", NS, "t-decode")


def decode_spec(*, replicas: int, external: bool) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(SPEC)
    decode = spec["roles"]["decode"]
    decode["replicas"] = replicas
    if external:
        decode["autoscaling"] = {"mode": "external"}
    return spec


def owners(kube: MemoryKube) -> dict[str, str]:
    return kube.replica_owners[DECODE]


def running(kube: MemoryKube, replicas: int) -> None:
    """The LWS controller has made `replicas` groups, all ready, on the current spec."""
    lws = kube.get(*DECODE)
    status = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas}
    kube.put({**lws, "status": status})


async def test_the_model_resets_a_field_its_sole_owner_lets_go_of() -> None:
    """What the hand-over exists for: without it, the operator's apply without spec.replicas would
    reset a workload's count to 1 (so the tests below can fail)."""
    kube = MemoryKube()
    meta = {"name": "t-decode", "namespace": NS}
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": meta}
    await kube.apply({**lws, "spec": {"replicas": 3, "startupPolicy": "LeaderCreated"}})
    await kube.apply({**lws, "spec": {"startupPolicy": "LeaderCreated"}})
    assert kube.get(*DECODE)["spec"]["replicas"] == 1


async def test_an_external_role_is_created_with_the_specs_count_and_handed_over() -> None:
    kube = MemoryKube()
    await run(kube, decode_spec(replicas=3, external=True))
    lws = kube.get(*DECODE)
    assert lws["spec"]["replicas"] == 3
    assert owners(kube) == {REPLICAS_HANDOVER_MANAGER: "Apply"}, "the operator let go"
    assert not owns_replicas(lws, OPERATOR)
    assert owns_replicas(kube.get("LeaderWorkerSet", NS, "t-prefill"), OPERATOR), (
        "prefill stays the operator's"
    )
    kube.writes.clear()
    await run(kube, decode_spec(replicas=3, external=True))
    assert kube.writes == {}, "handed over once"


async def test_a_scalers_count_is_kept_and_reported() -> None:
    kube = MemoryKube()
    spec = decode_spec(replicas=1, external=True)
    await run(kube, spec)
    kube.scale(*DECODE, 4, manager="horizontal-pod-autoscaler")
    running(kube, 4)
    kube.writes.clear()
    result = await run(kube, spec)
    assert kube.get(*DECODE)["spec"]["replicas"] == 4
    assert set(kube.writes) <= {"status"}, kube.writes
    assert "Restored" not in reasons(result)
    assert "Scaled" not in reasons(result)
    role = kube.statuses[(NS, "t")]["roles"]["decode"]
    assert (role["replicas"], role["ready"]) == (4, 4)
    assert "decode: 4/4 ready" in conditions(kube)["Ready"]["message"]
    spec["roles"]["decode"]["replicas"] = 2  # the initial count: no longer used once created
    await run(kube, spec, generation=2)
    assert kube.get(*DECODE)["spec"]["replicas"] == 4


async def test_a_role_switched_to_external_keeps_the_count_it_runs() -> None:
    kube = MemoryKube()
    await run(kube, decode_spec(replicas=3, external=False))
    assert owners(kube) == {OPERATOR: "Apply"}
    await run(kube, decode_spec(replicas=3, external=True), generation=2)
    assert kube.get(*DECODE)["spec"]["replicas"] == 3, "not reset to 1"
    assert owners(kube) == {REPLICAS_HANDOVER_MANAGER: "Apply"}
    kube.scale(*DECODE, 5)
    await run(kube, decode_spec(replicas=3, external=True), generation=2)
    assert kube.get(*DECODE)["spec"]["replicas"] == 5


async def test_switched_back_to_operator_mode_the_operator_takes_the_count_back() -> None:
    kube = MemoryKube()
    await run(kube, decode_spec(replicas=1, external=True))
    kube.scale(*DECODE, 4)
    result = await run(kube, decode_spec(replicas=2, external=False), generation=2)
    assert kube.get(*DECODE)["spec"]["replicas"] == 2
    assert owners(kube) == {OPERATOR: "Apply"}
    assert "decode: 4 -> 2 groups" in [d.message for d in result.decisions if d.reason == "Scaled"]


async def test_a_count_changed_since_it_was_read_is_not_handed_over() -> None:
    """The hand-over is not forced: a scaler's newer count is a 409 (retried on a fresh read), never
    overwritten with the count the reconcile read."""
    kube = MemoryKube()
    await run(kube, decode_spec(replicas=3, external=False))
    stale = copy.deepcopy(kube.get(*DECODE))
    kube.scale(*DECODE, 6, manager="horizontal-pod-autoscaler")
    with pytest.raises(RetryableError):
        await kube.hand_over_replicas(stale)
    assert kube.get(*DECODE)["spec"]["replicas"] == 6


async def test_a_deployment_role_is_handed_over_too() -> None:
    """A colocated worker role in one pod per group: a Deployment, handed over the same way."""
    spec = yaml.safe_load((REPO / "examples" / "mixtral-8x7b.yaml").read_text())["spec"]
    spec["roles"]["worker"]["replicas"] = 3
    kube = MemoryKube()
    await run(kube, spec)
    worker = ("Deployment", NS, "t-worker")
    spec["roles"]["worker"]["autoscaling"] = {"mode": "external"}
    await run(kube, spec, generation=2)
    assert kube.get(*worker)["spec"]["replicas"] == 3
    assert kube.replica_owners[worker] == {REPLICAS_HANDOVER_MANAGER: "Apply"}
