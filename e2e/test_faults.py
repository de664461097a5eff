"""Faults one tenant can cause, on real pods: what the operator did and what it kept doing.

A pod serving hostile metrics: a tenant's pod (busybox httpd on the real node) labelled as the group
leader of a ModelDeployment's decode role, whose /metrics says the queue is +Inf. The autoscaler
scrapes it (no Prometheus: the operator reads the role's pods itself) and must report that
deployment's metrics as unavailable, scale nothing, and go on reconciling. Before #14 the +Inf
reached the decision (ceil(inf)) and the exception stopped the autoscaler, and with it the operator.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.handle import Cluster
from e2e.operator_process import eventually, get_json, scraping_operator
from e2e.real_pods import busybox_pod
from e2e.reliability import Outcome, RecordProperty, record
from kubemoe_operator.plan.command import PORT

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "e2e" / "manifests" / "autoscaled.yaml"
NAME = "autoscaled"
INTERVAL_S = 2.0


def _condition(obj: dict[str, Any], type: str) -> dict[str, Any]:
    return next((dict(c) for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type), {})


def _hostile_leader(page: str) -> dict[str, Any]:
    script = (
        f"mkdir -p /tmp/w && printf '%s\\n' '{page}' > /tmp/w/metrics && exec httpd -f -p {PORT} -h /tmp/w"
    )
    labels = {"kubemoe.io/deployment": NAME, "kubemoe.io/role": "decode", "kubemoe.io/leader": "true"}
    return busybox_pod("not-a-runtime", script, labels=labels)


def test_a_pod_serving_hostile_metrics_stops_only_its_own_autoscaling(
    cluster: Cluster,
    operator_cluster: Cluster,
    real_namespace: str,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    ns = real_namespace  # every pod here lands on the real node; the model's GPU pods stay Pending
    labels = f'deployment="{NAME}",role="decode",group="0",rank="0"'
    cluster.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        stdin=yaml.safe_dump(_hostile_leader(f"kubemoe_requests_waiting{{{labels}}} +Inf")),
    )
    cluster.kubectl("wait", "-n", ns, "pod/not-a-runtime", "--for=condition=Ready", "--timeout=60s")
    lease = f"kubemoe-operator-faults-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "operator.log"
    proc = scraping_operator(
        operator_cluster,
        ns,
        log=log,
        lease_name=lease,
        interval_s=INTERVAL_S,
        extra=("--resync-seconds", "3"),
    )
    proc.start()
    try:
        cluster.kubectl("apply", "-n", ns, "-f", str(MANIFEST))

        def refused() -> dict[str, Any] | None:
            c = _condition(get_json(cluster, "md", NAME, "-n", ns), "MetricsAvailable")
            return c if "decode: " in c.get("message", "") and "unreadable" in c["message"] else None

        cond = eventually(
            refused, timeout=90, what="MetricsAvailable False naming decode's unreadable /metrics"
        )
        assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable"), cond
        assert "is inf" in cond["message"], cond
        obj = get_json(cluster, "md", NAME, "-n", ns)
        assert ((obj["status"].get("roles") or {}).get("decode") or {}).get("desired") is None, (
            "nothing scaled"
        )
        # The operator goes on: a spec change is still planned and rendered (observedGeneration follows).
        cluster.kubectl(
            "patch",
            "md",
            NAME,
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec":{"roles":{"decode":{"replicas":2}}}}',
        )
        generation = get_json(cluster, "md", NAME, "-n", ns)["metadata"]["generation"]
        eventually(
            lambda: get_json(cluster, "md", NAME, "-n", ns)["status"].get("observedGeneration") == generation,
            timeout=30,
            what="the next generation reconciled",
        )
        assert proc.proc is not None
        assert proc.proc.poll() is None, "the operator is still running"
        assert "Traceback" not in proc.text(), proc.text()[-3000:]
        record(
            record_property,
            Outcome(
                fault="a tenant's pod serving hostile metrics (+Inf) as a decode leader, on the real node",
                client_saw=(
                    "that deployment: MetricsAvailable=False naming decode's unreadable /metrics, nothing "
                    "scaled; the operator went on (the next spec change reconciled)"
                ),
                lost="none",
                recover_s=None,
            ),
        )
    finally:
        proc.stop()
