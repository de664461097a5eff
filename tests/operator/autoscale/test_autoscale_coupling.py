"""perDecode: prefill kept within min..max groups per decode group, following decode's own decision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.spec import Autoscaling, MetricTarget, MetricType, PerDecode, RoleName
from kubemoe_operator.api.status import ModelDeploymentStatus, now_utc
from kubemoe_operator.autoscale.decide import Decision, couple, decide
from kubemoe_operator.autoscale.loop import Autoscaler, RoleOutcome, coupled, groups_now, status_apply
from kubemoe_operator.autoscale.signals import RoleSelector
from tests.operator.reconcile.memory_kube import MemoryKube

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

QUEUE = [MetricTarget(type="queue-depth", target=4)]


def _prefill_policy(lo: float, hi: float, *, metrics: bool = True) -> Autoscaling:
    return Autoscaling(
        min_replicas=1,
        max_replicas=8,
        metrics=QUEUE if metrics else [],
        per_decode=PerDecode(min=lo, max=hi),
        max_step=4,
    )


def _own(current: int, queue: float | None, policy: Autoscaling) -> Decision:
    samples: dict[MetricType, float | None] = {"queue-depth": queue} if policy.metrics else {}
    return decide(current=current, samples=samples, policy=policy, history=[], now=0.0)


def test_prefill_without_metrics_follows_decode_at_a_fixed_ratio() -> None:
    policy = _prefill_policy(0.5, 0.5, metrics=False)
    ratio = policy.per_decode
    assert ratio is not None
    for decode, want in [(1, 1), (2, 1), (3, 2), (4, 2), (8, 4)]:
        d = couple(_own(2, None, policy), current=2, decode=decode, ratio=ratio, policy=policy)
        assert d.desired == want, (decode, d)
        if want != 2:
            assert d.signal == "perDecode"
            assert "per decode group" in d.reason


def test_own_metrics_move_prefill_only_within_the_bounds() -> None:
    policy = _prefill_policy(0.5, 1.0)
    ratio = policy.per_decode
    assert ratio is not None
    # prefill's queue asks for 4x: bounded to 1.0 per decode group (4 decode -> at most 4).
    up = couple(_own(2, 16.0, policy), current=2, decode=4, ratio=ratio, policy=policy)
    assert up.desired == 4
    assert up.signal == "perDecode"
    # idle prefill would go to 1, but 6 decode groups need at least 3 prefill groups.
    down = couple(_own(4, 0.1, policy), current=4, decode=6, ratio=ratio, policy=policy)
    assert down.desired == 3
    assert down.signal == "perDecode"
    # within the bounds its own signal decides, untouched.
    own = _own(2, 8.0, policy)
    assert couple(own, current=2, decode=4, ratio=ratio, policy=policy) is own
    assert own.signal == "queue-depth"


def test_min_and_max_replicas_win_over_the_ratio() -> None:
    policy = Autoscaling(min_replicas=2, max_replicas=3, per_decode=PerDecode(min=1, max=1))
    ratio = policy.per_decode
    assert ratio is not None
    assert couple(_own(2, None, policy), current=2, decode=8, ratio=ratio, policy=policy).desired == 3
    assert couple(_own(2, None, policy), current=2, decode=1, ratio=ratio, policy=policy).desired == 2


def test_a_ratio_with_no_whole_number_inside_takes_the_lower_bound() -> None:
    policy = _prefill_policy(0.4, 0.45, metrics=False)
    ratio = policy.per_decode
    assert ratio is not None
    # 3 decode groups: 1.2..1.35 prefill groups holds no whole number; 2 keeps prefill above min.
    assert couple(_own(1, None, policy), current=1, decode=3, ratio=ratio, policy=policy).desired == 2


def _outcome(role: str, current: int, decision: Decision | None, error: str | None = None) -> RoleOutcome:
    return RoleOutcome(role=role, current=current, previous=None, decision=decision, error=error)


def test_the_loop_couples_prefill_to_decodes_new_decision_and_says_so_in_status() -> None:
    decode_policy = Autoscaling(min_replicas=1, max_replicas=8, metrics=QUEUE, max_step=2)
    prefill_policy = _prefill_policy(1.0, 1.0, metrics=False)
    policies: dict[RoleName, Autoscaling] = {"prefill": prefill_policy, "decode": decode_policy}
    decode = decide(
        current=2, ready=2, samples={"queue-depth": 8.0}, policy=decode_policy, history=[], now=0.0
    )
    assert decode.desired == 4
    outcomes = [
        _outcome("prefill", 2, _own(2, None, prefill_policy)),
        _outcome("decode", 2, decode),
    ]
    out = coupled(outcomes, policies=policies, current={"prefill": 2, "decode": 2})
    assert [o.new_desired for o in out] == [4, 4]
    now = now_utc()
    body = status_apply(old=None, outcomes=out, source="test", generation=1, now=now)
    assert body is not None
    at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert body["roles"] == {
        "prefill": {"desired": 4, "decidedBy": "perDecode", "lastScaleTime": at},
        "decode": {"desired": 4, "decidedBy": "queue-depth", "lastScaleTime": at},
    }


def test_decode_unreadable_couples_to_the_groups_decode_runs_and_prefill_unreadable_holds() -> None:
    prefill_policy = _prefill_policy(1.0, 2.0)
    decode_policy = Autoscaling(min_replicas=1, max_replicas=8, metrics=QUEUE)
    policies: dict[RoleName, Autoscaling] = {"prefill": prefill_policy, "decode": decode_policy}
    # decode's metrics are out: its current 3 groups bound prefill (at least 3), not a guess.
    out = coupled(
        [_outcome("prefill", 1, _own(1, 4.0, prefill_policy)), _outcome("decode", 3, None, "down")],
        policies=policies,
        current={"prefill": 1, "decode": 3},
    )
    assert out[0].new_desired == 3
    # prefill's own metrics are out: nothing moves it (an outage changes nothing, coupled or not).
    out = coupled(
        [_outcome("prefill", 1, None, "down"), _outcome("decode", 2, _own(2, 16.0, decode_policy))],
        policies=policies,
        current={"prefill": 1, "decode": 2},
    )
    assert out[0].new_desired is None
    assert out[1].new_desired is not None


async def test_the_operators_metrics_show_prefills_coupled_decision_not_its_own_wish() -> None:
    """decode's queue asks for 4 groups; prefill (1 per decode group) is idle and alone would hold at 1:
    the desired-replicas gauge and the decisions counter must say 4 and "up" for prefill."""
    manifest = yaml.safe_load((EXAMPLES / "tiny-moe.yaml").read_text())
    manifest["metadata"].update(namespace="ns", uid="u-1", generation=1, resourceVersion="1")
    roles = manifest["spec"]["roles"]
    roles["decode"]["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 8,
        "maxStep": 4,
        "scaleUpWindowSeconds": 0,
        "metrics": [{"type": "queue-depth", "target": 4}],
    }
    roles["prefill"]["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 8,
        "maxStep": 4,
        "scaleUpWindowSeconds": 0,
        "metrics": [{"type": "queue-depth", "target": 4}],
        "perDecode": {"min": 1, "max": 1},
    }

    class Queues:
        async def sample(
            self, sel: RoleSelector, metrics: Sequence[MetricType]
        ) -> dict[MetricType, float | None]:
            return {"queue-depth": 16.0 if sel.role == "decode" else 0.0}

    scaler = Autoscaler(kube=MemoryKube(), source=Queues(), source_name="test", interval_s=1.0)
    outcomes = {o.role: o for o in await scaler.evaluate(manifest)}
    assert outcomes["decode"].decision is not None
    assert outcomes["decode"].decision.desired == 4
    assert outcomes["prefill"].decision is not None
    assert outcomes["prefill"].decision.desired == 4
    metrics = scaler.metrics.registry
    assert (
        metrics.get_sample_value(
            "kubemoe_operator_autoscale_desired_replicas",
            {"namespace": "ns", "deployment": "tiny-moe", "role": "prefill"},
        )
        == 4
    )
    labels = {"namespace": "ns", "deployment": "tiny-moe", "role": "prefill"}
    assert (
        metrics.get_sample_value("kubemoe_operator_autoscale_decisions_total", {**labels, "direction": "up"})
        == 1
    )
    assert (
        metrics.get_sample_value(
            "kubemoe_operator_autoscale_decisions_total", {**labels, "direction": "hold"}
        )
        is None
    )


def test_an_externally_scaled_decode_counts_the_groups_its_scaler_runs() -> None:
    """decode scaled by an HPA (mode external): its spec.replicas is only the first count; perDecode
    follows the groups the reconciler saw running (status), or prefill would shrink under a busy decode."""
    manifest = yaml.safe_load((EXAMPLES / "autoscaling-prometheus.yaml").read_text())
    roles = manifest["spec"]["roles"]
    roles["prefill"]["replicas"] = 3
    roles["prefill"]["autoscaling"]["perDecode"] = {"min": 1, "max": 1}
    roles["decode"]["replicas"] = 2
    roles["decode"]["autoscaling"] = {"mode": "external"}
    md = parse_manifest(manifest)
    status = ModelDeploymentStatus.model_validate({"roles": {"decode": {"replicas": 6, "ready": 6}}})
    assert groups_now(md.spec, status) == {"prefill": 3, "decode": 6}
    starting = ModelDeploymentStatus.model_validate({"roles": {"decode": {"replicas": 0}}})
    assert groups_now(md.spec, starting)["decode"] == 2  # none yet: its first count
    assert groups_now(md.spec, None)["decode"] == 2
