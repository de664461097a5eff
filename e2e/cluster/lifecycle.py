"""A whole test cluster: the kwok control plane and nodes (kwok.py), then any real nodes
(realnode.py) with the kube-proxy and CoreDNS they need (node_services.py); and all of it down."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from e2e.cluster import build, kwok, node_services, realnode
from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import MAX_REAL_NODES, RealNode, run_root


@contextlib.contextmanager
def claimed(name: str) -> Iterator[None]:
    """Hold cluster `name` for one user (an e2e session) until the block ends: a second one would
    replace the first's control plane under it (`up` downs a cluster of the same name first)."""
    kwok.run_root().mkdir(parents=True, exist_ok=True)
    path = kwok.run_root() / f"{name}.lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(
                f"cluster {name!r} is in use by another e2e session (pid {f.read().strip() or '?'}); "
                "give this one a cluster of its own with KUBEMOE_E2E_CLUSTER_NAME=NAME "
                "(and KUBEMOE_E2E_REAL_NODES=0: one cluster with real nodes per machine)"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def real_nodes_of(name: str) -> list[RealNode]:
    """The real nodes of cluster `name` that have a run directory here (up, or left behind)."""
    root = run_root()
    if not root.exists():
        return []
    prefix = f"{name}-real-"
    indices = [int(d.name[len(prefix) :]) for d in root.iterdir() if d.name.startswith(prefix)]
    return [RealNode(name, i) for i in sorted(i for i in indices if 0 <= i < MAX_REAL_NODES)]


def _refuse_second_real_cluster(name: str) -> None:
    """One cluster with real nodes per host: they share its iptables (one kube-proxy) and the
    benchmarking address ranges."""
    root = run_root()
    others = sorted(d.name for d in root.iterdir() if "-real-" in d.name) if root.exists() else []
    others = [o for o in others if not o.startswith(f"{name}-real-")]
    if others:
        raise RuntimeError(
            f"real nodes of another cluster are up here ({', '.join(others)}): one cluster with real "
            "nodes per machine. Stop it with `python -m e2e.cluster --name NAME down`, or start this "
            "one with --real-nodes 0 (KUBEMOE_E2E_REAL_NODES=0 for the e2e suite)."
        )


def up(config: kwok.ClusterConfig, *, paths: build.Paths | None = None) -> Cluster:
    if not 0 <= config.real_nodes <= MAX_REAL_NODES:
        raise ValueError(f"real_nodes must be 0..{MAX_REAL_NODES}, not {config.real_nodes}")
    if config.real_nodes:
        _refuse_second_real_cluster(config.name)
    down(config.name, paths=paths)
    t0 = time.monotonic()
    cluster = kwok.up(config, paths=paths)
    try:
        for i in range(config.real_nodes):
            realnode.up_node(RealNode(config.name, i), cluster)
        if config.real_nodes:
            node_services.up_services(config.name, cluster)
    except BaseException:
        down(config.name, paths=paths)
        raise
    if config.real_nodes:
        realnode.log(f"cluster with {config.real_nodes} real node(s) ready in {time.monotonic() - t0:.1f}s")
    return cluster


def down(name: str, *, paths: build.Paths | None = None) -> list[str]:
    """Stop everything of cluster `name`; return what could not be undone on the host (empty: all)."""
    problems = node_services.down_services(name)
    handle = kwok.existing(name)
    for node in reversed(real_nodes_of(name)):  # each restores the host as it found it: last first
        problems += realnode.down_node(node, cluster=handle)
    kwok.down(name, paths=paths)
    return problems
