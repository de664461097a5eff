"""What the autoscaler's loop writes into status: desired only when a decision moves a role,
the MetricsAvailable condition on transitions, and every owned field named in each apply."""

from __future__ import annotations

import socket
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubemoe_operator.api.spec import Autoscaling, MetricTarget
from kubemoe_operator.api.status import Condition, ModelDeploymentStatus, RoleStatus
from kubemoe_operator.autoscale.decide import Decision, decide
from kubemoe_operator.autoscale.loop import (
    CONDITION,
    REASON_READ,
    REASON_UNAVAILABLE,
    RoleOutcome,
    metrics_condition,
    owns_status,
    status_apply,
)
from kubemoe_operator.run.metrics import MetricsServer, OperatorMetrics
from kubemoe_operator.run.settings import parse_settings

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2025, 1, 1, 12, 5, tzinfo=UTC)
SOURCE = "Prometheus at http://prom:9090"
READ = f"autoscaling prefill, decode on metrics from {SOURCE}"
POLICY = Autoscaling(
    min_replicas=1, max_replicas=4, metrics=[MetricTarget(type="queue-depth", target=5)], max_step=1
)


def _decision(*, current: int, queue: float | None) -> Decision:
    return decide(current=current, samples={"queue-depth": queue}, policy=POLICY, history=[], now=100.0)


def _outcome(
    role: str, *, current: int, queue: float | None = 5.0, previous: int | None = None
) -> RoleOutcome:
    return RoleOutcome(
        role=role, current=current, previous=previous, decision=_decision(current=current, queue=queue)
    )


def _failed(role: str, *, current: int, previous: int | None = None) -> RoleOutcome:
    return RoleOutcome(role=role, current=current, previous=previous, error="Prometheus unreachable")


def _status(
    *, condition: tuple[str, str, str] | None = None, desired: dict[str, int] | None = None
) -> ModelDeploymentStatus:
    conds = [
        Condition(type="Ready", status="True", reason="AllGroupsReady", last_transition_time=T0),
    ]
    if condition is not None:
        conds.append(
            Condition(
                type=CONDITION,
                status=condition[0],
                reason=condition[1],
                message=condition[2],
                last_transition_time=T0,
            )
        )
    roles = {r: RoleStatus(replicas=1, ready=1, desired=d) for r, d in (desired or {}).items()}
    return ModelDeploymentStatus(conditions=conds, roles=roles)


def test_new_desired_only_when_the_decision_moves_the_role() -> None:
    assert _outcome("decode", current=2, queue=5.0).new_desired is None  # on target
    assert _outcome("decode", current=2, queue=10.0).new_desired == 3  # up, one step
    assert _outcome("decode", current=2, queue=10.0, previous=3).new_desired is None  # already there
    assert _outcome("decode", current=2, queue=None).new_desired is None  # missing: hold
    assert _failed("decode", current=2).new_desired is None


def test_the_first_evaluation_reports_metrics_read_and_writes_no_desired() -> None:
    outcomes = [_outcome("prefill", current=1), _outcome("decode", current=2)]
    body = status_apply(old=_status(), outcomes=outcomes, source=SOURCE, generation=3, now=T1)
    assert body is not None
    (cond,) = body["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == (CONDITION, "True", REASON_READ)
    assert cond["message"] == READ
    assert cond["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert cond["observedGeneration"] == 3
    assert "roles" not in body  # spec.replicas still rules both roles


def test_nothing_changed_writes_nothing() -> None:
    old = _status(condition=("True", REASON_READ, READ), desired={"decode": 3})
    outcomes = [_outcome("prefill", current=1), _outcome("decode", current=3, previous=3)]
    assert status_apply(old=old, outcomes=outcomes, source=SOURCE, generation=3, now=T1) is None


def test_a_scaled_role_writes_its_desired_and_carries_the_others() -> None:
    old = _status(condition=("True", REASON_READ, READ), desired={"prefill": 2})
    outcomes = [
        _outcome("prefill", current=2, queue=5.0, previous=2),
        _outcome("decode", current=1, queue=20.0),
    ]
    body = status_apply(old=old, outcomes=outcomes, source=SOURCE, generation=3, now=T1)
    assert body is not None
    # prefill's desired is named again: a server-side apply that left it out would delete it.
    assert body["roles"] == {
        "prefill": {"desired": 2},
        "decode": {"desired": 2, "decidedBy": "queue-depth", "lastScaleTime": "2025-01-01T12:05:00Z"},
    }
    (cond,) = body["conditions"]
    assert (cond["status"], cond["lastTransitionTime"]) == ("True", "2025-01-01T12:00:00Z")


def test_unreadable_metrics_set_the_condition_false_and_keep_every_desired() -> None:
    old = _status(condition=("True", REASON_READ, READ), desired={"decode": 3})
    outcomes = [_outcome("prefill", current=1), _failed("decode", current=3, previous=3)]
    body = status_apply(old=old, outcomes=outcomes, source=SOURCE, generation=4, now=T1)
    assert body is not None
    (cond,) = body["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", REASON_UNAVAILABLE)
    assert cond["message"] == "not scaling decode: decode: Prometheus unreachable"
    assert cond["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert body["roles"] == {"decode": {"desired": 3}}
    # Still unreadable next time: no write.
    again = _status(condition=("False", REASON_UNAVAILABLE, cond["message"]), desired={"decode": 3})
    assert status_apply(old=again, outcomes=outcomes, source=SOURCE, generation=4, now=T1) is None


def test_a_new_message_is_written_and_keeps_the_transition_time() -> None:
    old = _status(condition=("False", REASON_UNAVAILABLE, "not scaling decode: no pods"))
    outcomes = [_failed("decode", current=2)]
    body = status_apply(old=old, outcomes=outcomes, source=SOURCE, generation=4, now=T1)
    assert body is not None
    (cond,) = body["conditions"]
    assert cond["message"] == "not scaling decode: decode: Prometheus unreachable"
    assert cond["lastTransitionTime"] == "2025-01-01T12:00:00Z"


def test_no_series_yet_counts_as_unavailable() -> None:
    available, reason, message = metrics_condition([_outcome("decode", current=2, queue=None)], source=SOURCE)
    assert (available, reason) == (False, REASON_UNAVAILABLE)
    assert message == "not scaling decode: decode: metrics unavailable (queue-depth); holding 2"


def test_settings_take_the_autoscaler_and_metrics_flags() -> None:
    settings, _ = parse_settings(
        [
            "--prometheus-url",
            "http://prom:9090",
            "--autoscale-interval-seconds",
            "2",
            "--metrics-port",
            "9100",
        ]
    )
    assert (settings.prometheus_url, settings.autoscale_interval_seconds, settings.metrics_port) == (
        "http://prom:9090",
        2.0,
        9100,
    )
    defaults, _ = parse_settings([])
    assert (defaults.prometheus_url, defaults.autoscale_interval_seconds, defaults.metrics_port) == (
        None,
        15.0,
        None,
    )


def test_the_operator_serves_its_own_metrics() -> None:
    metrics = OperatorMetrics()
    metrics.reconciles.labels(result="ok").inc()
    metrics.desired.labels("ns", "md", "decode").set(3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = MetricsServer.start(metrics, port=port, address="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    assert 'kubemoe_operator_reconciles_total{result="ok"} 1.0' in text
    assert (
        'kubemoe_operator_autoscale_desired_replicas{deployment="md",namespace="ns",role="decode"} 3.0'
        in text
    )


def test_owns_status_reads_the_autoscalers_apply_entry_with_fields_only() -> None:
    def body(*entries: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"managedFields": list(entries)}}

    owned: dict[str, Any] = {"f:status": {"f:roles": {"f:decode": {"f:desired": {}}}}}
    mine: dict[str, Any] = {
        "manager": "kubemoe-autoscaler",
        "operation": "Apply",
        "subresource": "status",
        "fieldsV1": owned,
    }
    assert owns_status(body(mine), "kubemoe-autoscaler")
    assert not owns_status(body(), "kubemoe-autoscaler")
    assert not owns_status({"metadata": {}}, "kubemoe-autoscaler")
    assert not owns_status(body({**mine, "manager": "kubemoe-operator"}), "kubemoe-autoscaler")
    assert not owns_status(body({**mine, "operation": "Update"}), "kubemoe-autoscaler")
    assert not owns_status(body({**mine, "subresource": ""}), "kubemoe-autoscaler")
    assert not owns_status(body({**mine, "fieldsV1": {"f:status": {}}}), "kubemoe-autoscaler")


def test_a_desired_clamped_by_the_bounds_is_written_down_to_what_runs() -> None:
    # desired 5, then maxReplicas lowered to 3: the role runs 3 and the decision is to stay. The 5 is
    # written down to 3, quietly (no new desired, so no event and no cooldown); left at 5, raising
    # maxReplicas again jumped the role to 5 past the windows, the cooldown and maxStep.
    old = _status(condition=("True", REASON_READ, READ), desired={"decode": 5})
    stay = _outcome("decode", current=3, queue=5.0, previous=5)
    assert stay.new_desired is None
    assert stay.stale_desired
    body = status_apply(old=old, outcomes=[stay], source=SOURCE, generation=3, now=T1)
    assert body is not None
    assert body["roles"] == {"decode": {"desired": 3}}
    # a decision that moves the role, or one made without metrics, is not this case
    assert not _outcome("decode", current=3, queue=20.0, previous=5).stale_desired
    assert not _outcome("decode", current=3, queue=None, previous=5).stale_desired
    assert not _outcome("decode", current=3, queue=5.0, previous=3).stale_desired
    assert not _outcome("decode", current=3, queue=5.0).stale_desired
