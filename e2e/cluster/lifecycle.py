"""A whole test cluster: the kwok control plane and nodes (kwok.py), then any real nodes
(realnode.py) with the kube-proxy and CoreDNS they need (node_services.py); and all of it down."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from e2e.cluster import build, kwok, node_services, realnode
from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import MAX_REAL_NODES, RealNode, machine_lock, run_root


def lock_wait_s() -> float:
    """How long to wait for a cluster or the real nodes another run holds: KUBEMOE_E2E_LOCK_WAIT_S
    (.ci/run sets it, so a run that meets another still going waits it out); 0, refuse at once."""
    return float(os.environ.get("KUBEMOE_E2E_LOCK_WAIT_S") or 0)


def _lock(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def held() -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+") as f:
            deadline, said = time.monotonic() + lock_wait_s(), False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip() or "?"
                    # Held by this very process: waiting could never end.
                    if holder == str(os.getpid()) or time.monotonic() >= deadline:
                        raise RuntimeError(f"{what} (pid {holder})") from None
                    if not said:
                        realnode.log(f"waiting up to {lock_wait_s():.0f}s: {what} (pid {holder})")
                        said = True
                    time.sleep(5)
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield

    return held()


@contextlib.contextmanager
def claimed(name: str, *, real_nodes: bool = False) -> Iterator[None]:
    """Hold cluster `name` for one user (an e2e session) until the block ends: a second one would
    replace the first's control plane under it (`up` downs a cluster of the same name first). With
    real_nodes, hold this machine's real nodes too (they share its iptables and address ranges)."""
    hint = (
        "give this one a cluster of its own with KUBEMOE_E2E_CLUSTER_NAME=NAME "
        "and KUBEMOE_E2E_REAL_NODES=0 (one cluster with real nodes per machine)"
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _lock(
                kwok.run_root() / f"{name}.lock", f"cluster {name!r} is in use by another e2e session; {hint}"
            )
        )
        if real_nodes:
            stack.enter_context(_lock(machine_lock(), f"this machine's real nodes are in use; {hint}"))
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
    try:
        cluster = kwok.up(config, paths=paths)
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
    problems: list[str] = []
    handle = kwok.existing(name)
    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("kube-proxy and CoreDNS", lambda: node_services.down_services(name))
    ]
    for node in reversed(real_nodes_of(name)):  # each restores the host as it found it: last first
        steps.append((node.node_name, functools.partial(realnode.down_node, node, cluster=handle)))
    try:
        for what, step in steps:
            try:  # one step failing must not leave the others' processes and host changes behind
                problems += step()
            except Exception as err:
                problems.append(f"{what}: {type(err).__name__}: {err}")
    finally:
        kwok.down(name, paths=paths)
    return problems
