"""Session fixtures for end-to-end tests: a real control plane (or the one KUBEMOE_E2E_KUBECONFIG names)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import build, kwok, lifecycle, realnode
from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import REAL_NODE_LABEL
from e2e.cluster.nodes import GpuNodes
from e2e.identity import install_operator_identity
from e2e.operator_process import (
    OPERATOR_NAMESPACE,
    OperatorProcess,
    delete_namespace,
    install_crd,
    leading,
    operator_args,
    running_operator,
)

# KUBEMOE_E2E_CLUSTER_NAME lets two suites run side by side (each control plane on ports of its own).
E2E_CLUSTER_NAME = os.environ.get("KUBEMOE_E2E_CLUSTER_NAME", "kubemoe-e2e")
# Real nodes (kubelet + containerd: pods run as containers) beside the kwok ones. One cluster with
# real nodes per machine: a second suite run alongside sets KUBEMOE_E2E_REAL_NODES=0.
E2E_REAL_NODES = int(os.environ.get("KUBEMOE_E2E_REAL_NODES", "1"))
# Beside the default 4 x 8 H200 nodes: pools for the other examples' accelerators.
E2E_EXTRA_NODES = (
    GpuNodes(count=3, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559, name_prefix="h100-node"),
    GpuNodes(count=2, gpu_product="NVIDIA-L40S", gpu_memory_mib=46068, name_prefix="l40s-node"),
    GpuNodes(count=2, gpus_per_node=0, cpu="32", memory="128Gi", name_prefix="cpu-node"),
)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A ready cluster: 4 kwok GPU nodes (8 x H200 each) and the E2E_EXTRA_NODES pools,
    kube-controller-manager, scheduler, LWS; E2E_REAL_NODES real nodes with kube-proxy and CoreDNS.
    Its teardown fails if a real node left anything behind on the host."""
    paths = build.ensure_built()
    external = os.environ.get("KUBEMOE_E2E_KUBECONFIG")
    if external:
        yield Cluster(kubeconfig=Path(external), bin_dir=paths.bin)
        return
    config = kwok.ClusterConfig(name=E2E_CLUSTER_NAME, extra_nodes=E2E_EXTRA_NODES, real_nodes=E2E_REAL_NODES)
    with lifecycle.claimed(E2E_CLUSTER_NAME, real_nodes=E2E_REAL_NODES > 0):
        handle = lifecycle.up(config, paths=paths)
        try:
            yield handle
        finally:
            keep = os.environ.get("KUBEMOE_E2E_ARTIFACTS")  # a folder to keep the audit log in
            if keep and handle.audit_log is not None and handle.audit_log.exists():
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(handle.audit_log, Path(keep) / f"{E2E_CLUSTER_NAME}-audit.log")
            problems = lifecycle.down(E2E_CLUSTER_NAME, paths=paths)
            assert problems == [], f"the real nodes left this behind on the host: {problems}"


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> Cluster:
    """The cluster with the ModelDeployment CRD from crds/ installed and Established."""
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="session")
def operator_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """The cluster as the operator's ServiceAccount from the Helm chart (release `kubemoe` in
    kubemoe-system): the operator e2e runs with exactly the chart's RBAC, and its Lease lives
    in OPERATOR_NAMESPACE."""
    out = tmp_path_factory.mktemp("identity") / "operator-kubeconfig.yaml"
    return install_operator_identity(cluster, release="kubemoe", namespace=OPERATOR_NAMESPACE, out=out)


@pytest.fixture(scope="module")
def operator(
    operator_cluster: Cluster,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    """The operator as the Helm chart's ServiceAccount (every scenario also proves the chart's RBAC),
    watching the module's own module-scoped `namespace`, leading before the first test. A module sets
    operator_args' keywords in OPERATOR_FLAGS."""
    flags = getattr(request.module, "OPERATOR_FLAGS", {})
    log = tmp_path_factory.mktemp(f"operator-{request.module.__name__.rsplit('.', 1)[-1]}") / "operator.log"
    args = operator_args(namespace, **flags)
    with running_operator(operator_cluster, log=log, args=args, request=request) as proc:
        leading(proc)
        yield proc


@pytest.fixture
def the_charts_rbac_is_enough(operator: OperatorProcess) -> Iterator[None]:
    """After the test: the operator (as the chart's ServiceAccount) was never refused by the apiserver.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("the_charts_rbac_is_enough")`."""
    yield
    refused = [line for line in operator.text().splitlines() if "Forbidden" in line or " 403" in line]
    assert refused == [], refused[:5]


REAL_NODE_TOLERATION = {"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}


@contextlib.contextmanager
def pinned_to_real_nodes(cluster: Cluster, *, prefix: str = "r") -> Iterator[str]:
    """A fresh namespace whose pods all run on the real nodes (the PodNodeSelector and
    PodTolerationRestriction admission plugins pin them there: the router's and the operator's
    pods too, whatever the chart or the spec says), deleted afterwards."""
    if E2E_REAL_NODES == 0:
        pytest.skip("KUBEMOE_E2E_REAL_NODES=0: this cluster has no real node to run containers on")
    for node in lifecycle.real_nodes_of(E2E_CLUSTER_NAME):
        realnode.restore_own_images(node)  # a test's busybox pod must not meet ErrImageNeverPull
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl(
        "annotate",
        "namespace",
        name,
        f"scheduler.alpha.kubernetes.io/node-selector={REAL_NODE_LABEL}=true",
        f"scheduler.alpha.kubernetes.io/defaultTolerations={json.dumps([REAL_NODE_TOLERATION])}",
    )
    try:
        yield name
    finally:
        delete_namespace(cluster, name)


@pytest.fixture
def real_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace of one test's whose pods run on the real nodes (pinned_to_real_nodes)."""
    with pinned_to_real_nodes(cluster) as name:
        yield name


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (its pods gone before the next test starts:
    see delete_namespace)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    delete_namespace(cluster, name)
