"""Session fixtures for end-to-end tests: a real control plane (or the one KUBEMOE_E2E_KUBECONFIG names)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import build, kwok
from e2e.cluster.handle import Cluster

E2E_CLUSTER_NAME = "kubemoe-e2e"


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
