"""autoscaling.mode external on the real control plane: an HPA or `kubectl scale` owns a role's
replicas through the scale subresource, and the operator (as the chart's ServiceAccount) hands the
field over by server-side apply and never takes it back while the role stays external.

Each test deploys its own ModelDeployment (Mixtral disaggregated on the simulated H200 nodes, each
role a LeaderWorkerSet of 2-pod groups, or decode a Deployment of one-pod groups for the HPA: the
HPA controller resolves a LeaderWorkerSet only once its discovery has caught up, a resync or two
later) and removes it after. "The operator never reverts it" is
checked after the operator has applied the LeaderWorkerSet again (a pod annotation added to the spec)
and two more resyncs have run. The examples in examples/autoscaling-external/ are checked by a
server-side dry run.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.handle import Cluster
from e2e.identity import service_account_user
from e2e.operator_process import (
    OperatorProcess,
    eventually,
    get_json,
    get_or_none,
    scratch_namespace,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "autoscaling-external"
RESYNC_S = 2
OPERATOR_FLAGS = {"resync_s": RESYNC_S, "lease_name": "kubemoe-e2e-external"}  # e2e/conftest.py
pytestmark = pytest.mark.usefixtures("the_charts_rbac_is_enough")  # e2e/conftest.py
OPERATOR = "kubemoe-operator"
HANDOVER = "kubemoe-replicas-handover"

SPEC: dict[str, Any] = {
    "model": {
        "name": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "source": "hf://mistralai/Mixtral-8x7B-Instruct-v0.1",
    },
    "engine": {"kind": "vllm", "maxModelLen": 8192},
    "accelerator": {"type": "H200", "perPod": 1},
    "serving": {"mode": "disaggregated", "kvTransfer": {"connector": "nixl"}},
    "roles": {
        "prefill": {"replicas": 1, "parallelism": {"tensor": 1, "data": 2, "expert": 2}},
        "decode": {"replicas": 2, "parallelism": {"tensor": 1, "data": 2, "expert": 2}},
    },
    "router": {"replicas": 1},
    "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
}


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with scratch_namespace(cluster, prefix="ext") as ns:
        yield ns


Deploy = Callable[..., str]


@pytest.fixture
def deploy(cluster: Cluster, namespace: str, operator: OperatorProcess) -> Iterator[Deploy]:
    """deploy(name, decode={...}): SPEC with decode's fields updated, as ModelDeployment `name` in
    `namespace`; deleted after the test (its GPUs freed). Returns the name."""
    names: list[str] = []

    def apply(name: str, *, decode: dict[str, Any]) -> str:
        spec = copy.deepcopy(SPEC)
        spec["roles"]["decode"].update(decode)
        md = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name}}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps({**md, "spec": spec}))
        names.append(name)
        return name

    yield apply
    for name in names:
        cluster.kubectl("delete", "md", name, "-n", namespace, "--wait=true", "--timeout=60s")
    eventually(
        lambda: not get_json(cluster, "pods", "-n", namespace)["items"],
        timeout=120,
        what="the test's pods gone",
    )


def workload(cluster: Cluster, ns: str, name: str, kind: str = "lws") -> dict[str, Any]:
    """The decode role's LeaderWorkerSet (or `kind`), with its managedFields."""
    obj: dict[str, Any] = get_json(cluster, kind, f"{name}-decode", "-n", ns, "--show-managed-fields")
    return obj


def handed_over(cluster: Cluster, ns: str, name: str, kind: str = "lws") -> bool:
    """The decode workload exists and the operator's field manager no longer owns its replicas."""
    obj = get_or_none(cluster, kind, f"{name}-decode", "-n", ns, "--show-managed-fields")
    return obj is not None and OPERATOR not in replica_owners(obj)


def replica_owners(obj: dict[str, Any]) -> set[str]:
    """The field managers that own spec.replicas (by apply, or by an update through /scale)."""
    return {
        m["manager"]
        for m in obj["metadata"].get("managedFields") or []
        if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})
    }


def decode_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    md: dict[str, Any] = get_json(cluster, "md", name, "-n", ns)
    role: dict[str, Any] = ((md.get("status") or {}).get("roles") or {}).get("decode") or {}
    return role


def reported(cluster: Cluster, ns: str, name: str, replicas: int) -> None:
    """Wait until status.roles.decode shows `replicas` groups, all ready."""
    eventually(
        lambda: decode_status(cluster, ns, name) == {"replicas": replicas, "ready": replicas},
        timeout=60,
        what=f"status.roles.decode of {name} at {replicas} ready groups",
    )


def resyncs(operator: OperatorProcess, *, after: int, count: int) -> None:
    """Wait until the operator has listed ModelDeployments (begun a resync) `count` times since audit
    event `after`: the resync before the last one has reconciled every ModelDeployment."""
    user = service_account_user(operator.cluster)

    def seen() -> bool:
        events = operator.cluster.audit_events(user=user)[after:]
        lists = [
            e
            for e in events
            if e["verb"] == "list" and e.get("objectRef", {}).get("resource") == "modeldeployments"
        ]
        return len(lists) >= count

    eventually(seen, timeout=60, what=f"{count} resyncs")


def reapplied(
    cluster: Cluster, operator: OperatorProcess, ns: str, name: str, *, note: str, kind: str = "lws"
) -> None:
    """Change the spec so that the operator applies the decode workload again (a pod annotation),
    wait until it has, then for two more resyncs."""
    start = len(operator.cluster.audit_events(user=service_account_user(operator.cluster)))
    patch = {"spec": {"pod": {"annotations": {"example.com/note": note}}}}
    cluster.kubectl("patch", "md", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def applied() -> bool:
        spec = workload(cluster, ns, name, kind)["spec"]
        template = (
            spec["template"] if kind == "deployment" else spec["leaderWorkerTemplate"]["leaderTemplate"]
        )
        return bool((template["metadata"].get("annotations") or {}).get("example.com/note") == note)

    eventually(applied, timeout=60, what="the operator to apply the decode workload again")
    resyncs(operator, after=start, count=3)


def test_an_hpas_count_holds_and_is_reported(
    cluster: Cluster, namespace: str, operator: OperatorProcess, deploy: Deploy
) -> None:
    """Decode in one pod per group (a Deployment), created with the spec's 2 groups and handed over;
    the example's HPA, with minReplicas 3 (the HPA controller raises a target below its minimum
    without reading any metric), scales it to 3 through /scale; the operator applies it again and
    resyncs, and the 3 holds and is what status reports."""
    single_pod = {"tensor": 1, "data": 1, "expert": 1}
    decode = {"parallelism": single_pod, "autoscaling": {"mode": "external"}}
    ns, name = namespace, deploy("ext-hpa", decode=decode)
    eventually(
        lambda: handed_over(cluster, ns, name, "deployment"),
        timeout=60,
        what="decode created and handed over",
    )
    created = workload(cluster, ns, name, "deployment")
    assert created["spec"]["replicas"] == 2, "created with spec.roles.decode.replicas"
    assert replica_owners(created) == {HANDOVER}
    reported(cluster, ns, name, 2)

    hpa = yaml.safe_load((EXAMPLE / "hpa.yaml").read_text())
    hpa["metadata"]["name"] = hpa["spec"]["scaleTargetRef"]["name"] = f"{name}-decode"
    hpa["spec"].update(minReplicas=3, maxReplicas=4)
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(hpa))
    eventually(
        lambda: workload(cluster, ns, name, "deployment")["spec"]["replicas"] == 3,
        timeout=60,
        what="the HPA to scale to 3",
    )
    reported(cluster, ns, name, 3)
    reapplied(cluster, operator, ns, name, note="hpa", kind="deployment")
    after = workload(cluster, ns, name, "deployment")
    assert after["spec"]["replicas"] == 3, "the operator put its count back"
    assert OPERATOR not in replica_owners(after)
    assert HANDOVER not in replica_owners(after), "the HPA's update through /scale took the field"
    assert decode_status(cluster, ns, name) == {"replicas": 3, "ready": 3}


def test_a_role_switched_to_external_keeps_its_count_and_then_the_scalers(
    cluster: Cluster, namespace: str, operator: OperatorProcess, deploy: Deploy
) -> None:
    """Operator mode with 3 groups, then mode external: still 3 (not the default 1), owned by the
    hand-over manager alone; `kubectl scale` to 1 then holds through an apply and resyncs."""
    ns, name = namespace, deploy("ext-switch", decode={"replicas": 3})
    reported(cluster, ns, name, 3)
    assert replica_owners(workload(cluster, ns, name)) == {OPERATOR}

    patch = {"spec": {"roles": {"decode": {"autoscaling": {"mode": "external"}}}}}
    cluster.kubectl("patch", "md", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))
    eventually(lambda: handed_over(cluster, ns, name), timeout=60, what="the decode replicas handed over")
    handed = workload(cluster, ns, name)
    assert handed["spec"]["replicas"] == 3, "not reset to 1"
    assert replica_owners(handed) == {HANDOVER}

    cluster.kubectl("scale", "lws", f"{name}-decode", "-n", ns, "--replicas=1")
    reported(cluster, ns, name, 1)
    reapplied(cluster, operator, ns, name, note="scaled")
    assert workload(cluster, ns, name)["spec"]["replicas"] == 1, "the operator put its count back"
    assert decode_status(cluster, ns, name) == {"replicas": 1, "ready": 1}


def test_switched_back_to_operator_mode_the_operator_takes_the_count_back(
    cluster: Cluster, namespace: str, operator: OperatorProcess, deploy: Deploy
) -> None:
    ns, name = namespace, deploy("ext-back", decode={"replicas": 1, "autoscaling": {"mode": "external"}})
    eventually(lambda: handed_over(cluster, ns, name), timeout=60, what="decode created and handed over")
    cluster.kubectl("scale", "lws", f"{name}-decode", "-n", ns, "--replicas=3")
    reported(cluster, ns, name, 3)

    body = [{"op": "remove", "path": "/spec/roles/decode/autoscaling"}]  # mode operator, not autoscaled
    cluster.kubectl("patch", "md", name, "-n", ns, "--type=json", "-p", json.dumps(body))
    eventually(
        lambda: workload(cluster, ns, name)["spec"]["replicas"] == 1,
        timeout=60,
        what="the operator to set spec.roles.decode.replicas again",
    )
    assert OPERATOR in replica_owners(workload(cluster, ns, name))
    reported(cluster, ns, name, 1)


def test_the_example_passes_the_api_servers_validation(cluster: Cluster, namespace: str) -> None:
    """The ModelDeployment (CRD schema and CEL rules) and the HPA (autoscaling/v2), dry-run."""
    for path in sorted(EXAMPLE.glob("*.yaml")):
        out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", str(path))
        assert "serverside-applied (server dry run)" in out.stdout, (path, out.stdout)
