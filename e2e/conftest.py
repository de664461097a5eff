"""Session fixtures for end-to-end tests: a real control plane (or the one KUBEMOE_E2E_KUBECONFIG names)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import build, kwok
from e2e.cluster.handle import Cluster
from e2e.cluster.nodes import GpuNodes
from e2e.identity import install_operator_identity
from e2e.operator_process import delete_namespace, install_crd

# KUBEMOE_E2E_CLUSTER_NAME lets two suites run side by side (each control plane on ports of its own).
E2E_CLUSTER_NAME = os.environ.get("KUBEMOE_E2E_CLUSTER_NAME", "kubemoe-e2e")
# Beside the default 4 x 8 H200 nodes: pools for the other examples' accelerators.
E2E_EXTRA_NODES = (
    GpuNodes(count=3, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559, name_prefix="h100-node"),
    GpuNodes(count=2, gpu_product="NVIDIA-L40S", gpu_memory_mib=46068, name_prefix="l40s-node"),
    GpuNodes(count=2, gpus_per_node=0, cpu="32", memory="128Gi", name_prefix="cpu-node"),
)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A ready cluster: 4 kwok GPU nodes (8 x H200 each), kube-controller-manager, scheduler, LWS."""
    paths = build.ensure_built()
    external = os.environ.get("KUBEMOE_E2E_KUBECONFIG")
    if external:
        yield Cluster(kubeconfig=Path(external), bin_dir=paths.bin)
        return
    handle = kwok.up(kwok.ClusterConfig(name=E2E_CLUSTER_NAME, extra_nodes=E2E_EXTRA_NODES), paths=paths)
    try:
        yield handle
    finally:
        keep = os.environ.get("KUBEMOE_E2E_ARTIFACTS")  # a folder to keep the audit log in
        if keep and handle.audit_log is not None and handle.audit_log.exists():
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(handle.audit_log, Path(keep) / f"{E2E_CLUSTER_NAME}-audit.log")
        kwok.down(E2E_CLUSTER_NAME, paths=paths)


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> Cluster:
    """The cluster with the ModelDeployment CRD from crds/ installed and Established."""
    install_crd(cluster)
    return cluster


OPERATOR_NAMESPACE = "kubemoe-system"


@pytest.fixture(scope="session")
def operator_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """The cluster as the operator's ServiceAccount from the Helm chart (release `kubemoe` in
    kubemoe-system): the operator e2e runs with exactly the chart's RBAC, and its Lease lives
    in OPERATOR_NAMESPACE."""
    out = tmp_path_factory.mktemp("identity") / "operator-kubeconfig.yaml"
    return install_operator_identity(cluster, release="kubemoe", namespace=OPERATOR_NAMESPACE, out=out)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (its pods gone before the next test starts:
    see delete_namespace)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    delete_namespace(cluster, name)
