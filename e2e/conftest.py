"""Session fixtures for end-to-end tests: a real control plane (or the one KUBEMOE_E2E_KUBECONFIG names)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import build, kwok
from e2e.cluster.handle import Cluster

E2E_CLUSTER_NAME = "kubemoe-e2e"
REPO = Path(__file__).resolve().parents[1]
MD_CRD = REPO / "crds" / "kubemoe.io_modeldeployments.yaml"
MD_CRD_NAME = "modeldeployments.kubemoe.io"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A ready cluster: 4 kwok GPU nodes (8 x H200 each), kube-controller-manager, scheduler, LWS."""
    paths = build.ensure_built()
    external = os.environ.get("KUBEMOE_E2E_KUBECONFIG")
    if external:
        yield Cluster(kubeconfig=Path(external), bin_dir=paths.bin)
        return
    handle = kwok.up(kwok.ClusterConfig(name=E2E_CLUSTER_NAME), paths=paths)
    try:
        yield handle
    finally:
        kwok.down(E2E_CLUSTER_NAME, paths=paths)


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> Cluster:
    """The cluster with the ModelDeployment CRD from crds/ installed and Established."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubemoe-e2e", "-f", str(MD_CRD)
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{MD_CRD_NAME}", "--timeout=60s")
    return cluster


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")
