"""Weight-loading progress in the GroupsNotReady message: which pods are asked (running, not ready,
serving roles only), what their /ready bodies may say (untrusted), and the sum per role. The pods'
HTTP is a stand-in function here; the runtime's /ready body is tested in tests/runtime, and the two
meet on the real node."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubemoe_operator.reconcile.loading import (
    Loading,
    describe_loading,
    loading_pods,
    loading_progress,
    parse_loading,
)
from kubemoe_operator.reconcile.observe import WorkloadState
from kubemoe_operator.reconcile.status import REASON_NOT_READY, Facts, compute_status

GIB = 1 << 30


def pod(name: str, role: str, ip: str, *, ready: bool = False, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubemoe.io/role": role}},
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


PODS = [
    pod("d0", "decode", "10.0.0.1"),
    pod("d1", "decode", "10.0.0.2"),
    pod("p0", "prefill", "10.0.0.3", ready=True),  # ready: not asked
    pod("r0", "router", "10.0.0.4"),  # the router loads nothing
    pod("f0", "model-cache", "10.0.0.5"),  # the cache fill has its own progress
    pod("d2", "decode", "10.0.0.6", phase="Pending"),
]
BODIES = {
    "10.0.0.1": {"status": "loading", "bytes": 1 * GIB, "bytesTotal": 4 * GIB},
    "10.0.0.2": {"status": "loading", "bytes": 2 * GIB, "bytesTotal": 4 * GIB},
}


async def read_pod(ip: str, port: int, path: str) -> Mapping[str, Any] | None:
    assert (port, path) == (8000, "/ready")
    return BODIES.get(ip)


def test_only_running_serving_pods_that_are_not_ready_are_asked() -> None:
    assert loading_pods(PODS) == [("decode", "10.0.0.1"), ("decode", "10.0.0.2")]


async def test_the_role_sum_reaches_the_ready_message() -> None:
    loading = await loading_progress(PODS, read_pod)
    assert loading == {"decode": Loading(3 * GIB, 8 * GIB, 2)}
    facts = Facts(
        generation=1,
        layout="D2x(EP2)",
        roles={"decode": WorkloadState(wanted=2, replicas=2, ready=0, updated=2)},
        loading=loading,
    )
    status = compute_status(old=None, facts=facts, now=datetime(2026, 1, 1, tzinfo=UTC))
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.reason == REASON_NOT_READY
    assert ready.message == "decode: 0/2 ready; loading weights: decode 3.0 GiB of 8.0 GiB (38%, 2 pods)"


def test_a_body_is_untrusted() -> None:
    assert parse_loading({"status": "loading", "bytes": 5, "bytesTotal": 10}) == (5, 10)
    for hostile in (
        None,
        {"status": "ready", "bytes": 5, "bytesTotal": 10},
        {"status": "loading", "bytes": 11, "bytesTotal": 10},  # more read than there is
        {"status": "loading", "bytes": 0, "bytesTotal": 0},
        {"status": "loading", "bytes": -1, "bytesTotal": 10},
        {"status": "loading", "bytes": True, "bytesTotal": 10},
        {"status": "loading", "bytes": float("nan"), "bytesTotal": 10},
        {"status": "loading", "bytes": "5", "bytesTotal": 10},
    ):
        assert parse_loading(hostile) is None, hostile
    assert describe_loading({}) == ""
    assert describe_loading({"worker": Loading(512 << 20, GIB, 1)}) == (
        "loading weights: worker 512.0 MiB of 1.0 GiB (50%, 1 pod)"
    )
