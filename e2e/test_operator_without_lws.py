"""A cluster without the LeaderWorkerSet CRD: a multi-pod layout is refused whole, with a message."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import build, kwok
from e2e.cluster.handle import Cluster
from e2e.cluster.nodes import GpuNodes
from e2e.identity import install_operator_identity
from e2e.operator_process import (
    OperatorProcess,
    eventually,
    get_json,
    install_crd,
    running_operator,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "kubemoe-e2e-nolws"


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[Cluster]:
    paths = build.ensure_built()
    handle = kwok.up(kwok.ClusterConfig(name=NAME, with_lws=False, nodes=GpuNodes(count=1)), paths=paths)
    try:
        install_crd(handle)
        yield handle
    finally:
        kwok.down(NAME, paths=paths)


@pytest.fixture(scope="module")
def operator(
    bare_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator-nolws") / "operator.log"
    # As the Helm chart's ServiceAccount, installed into this cluster too: the chart's RBAC suffices.
    identity = install_operator_identity(
        bare_cluster, release="kubemoe", namespace="kubemoe-system", out=log.parent / "kubeconfig.yaml"
    )
    args = ("--resync-seconds", "3", "--no-leader-election")
    with running_operator(identity, log=log, args=args, request=request) as proc:
        yield proc


def test_multi_pod_groups_without_lws_are_refused_and_nothing_is_created(
    bare_cluster: Cluster, operator: OperatorProcess
) -> None:
    cluster = bare_cluster
    ns = f"nolws-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / "deepseek-v3.yaml"))

    def refused() -> dict[str, str] | None:
        obj = get_json(cluster, "md", "deepseek-v3", "-n", ns)
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["reason"] == "LeaderWorkerSetMissing":
                return dict(c)
        return None

    ready = eventually(refused, timeout=60, what="Ready=False reason LeaderWorkerSetMissing")
    assert ready["status"] == "False"
    assert "LeaderWorkerSet" in ready["message"]
    assert "install" in ready["message"].lower()
    obj = get_json(cluster, "md", "deepseek-v3", "-n", ns)
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["layout"] == "P1x(EP16) D1x(EP16)"
    created = get_json(
        cluster,
        "configmaps,services,poddisruptionbudgets,deployments,pods",
        "-n",
        ns,
        "-l",
        "kubemoe.io/deployment=deepseek-v3",
    )["items"]
    assert created == []
    assert operator.writes()
    assert all(w.split()[1] in ("ModelDeployment", "Event") for w in operator.writes())
    events = get_json(cluster, "events", "-n", ns, "--field-selector", "involvedObject.name=deepseek-v3")[
        "items"
    ]
    warnings = [e for e in events if e["type"] == "Warning" and e["reason"] == "LeaderWorkerSetMissing"]
    assert warnings, events
