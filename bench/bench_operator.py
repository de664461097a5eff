"""Operator at scale: N ModelDeployments on M simulated GPU nodes (defaults 100 on 1,000).

A dedicated cluster (real apiserver, scheduler, controller-manager, LWS; kwok nodes of 8 GPUs)
runs the operator as the Helm chart's ServiceAccount, so the apiserver's audit log counts its
requests. Measured:

- time from `kubectl apply` of N manifests to all their children created, and to all Ready;
- the reference: the very same child objects (taken from the operator's run) applied straight
  with kubectl into a fresh namespace, to all Deployments Available — the control plane's own
  speed for this work. The ratio operator/reference is the operator's overhead;
- API requests per ModelDeployment (apply to Ready), and requests and writes per resync;
- the operator's peak memory (VmHWM).

Run: `PYTHONPATH=. .venv/bin/python bench/bench_operator.py [--mds 100 --nodes 1000]` (`make bench`).
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import build, kwok
from e2e.cluster.handle import Cluster
from e2e.cluster.nodes import GpuNodes
from e2e.identity import install_operator_identity, service_account_user
from e2e.operator_process import OperatorProcess, install_crd, model_volume
from e2e.waiting import eventually

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "e2e" / "manifests" / "mixtral-h200.yaml"
NAME = "kubemoe-bench"
RESYNC_S = 20
WRITES = {"create", "update", "patch", "delete"}


def _manifests(count: int) -> str:
    base = yaml.safe_load(MANIFEST.read_text())
    docs = []
    for i in range(count):
        doc = copy.deepcopy(base)
        doc["metadata"]["name"] = f"md-{i:03d}"
        doc["spec"]["roles"]["worker"]["replicas"] = 1
        docs.append(doc)
    return yaml.safe_dump_all(docs)


def _items(cluster: Cluster, kind: str, ns: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kind, "-n", ns, "-o", "json", timeout=300).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _ready_count(cluster: Cluster, ns: str) -> int:
    return sum(1 for md in _items(cluster, "md", ns) if (md.get("status") or {}).get("phase") == "Ready")


def _available(cluster: Cluster, ns: str, expected: int) -> bool:
    deps = _items(cluster, "deployments", ns)
    ok = [d for d in deps if d.get("status", {}).get("availableReplicas", 0) >= d["spec"].get("replicas", 1)]
    return len(ok) >= expected


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    clean = {k: v for k, v in obj.items() if k != "status"}
    clean["metadata"] = {"name": meta["name"], "labels": meta.get("labels", {})}
    return clean


def _what(event: dict[str, Any]) -> str:
    ref = event.get("objectRef", {})
    return f"{event['verb']} {ref.get('resource', '?')}/{ref.get('subresource', '')}"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(*, mds: int, nodes: int) -> tuple[dict[str, float], Counter[str]]:
    paths = build.ensure_built()
    config = kwok.ClusterConfig(name=NAME, nodes=GpuNodes(count=nodes))
    t0 = time.monotonic()
    cluster = kwok.up(config, paths=paths)
    print(f"cluster with {nodes} nodes up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        install_crd(cluster)
        with tempfile.TemporaryDirectory() as tmp:
            identity = install_operator_identity(
                cluster, release="kubemoe", namespace="kubemoe-system", out=Path(tmp) / "kubeconfig.yaml"
            )
            user = service_account_user(identity)
            ns, ref_ns = "bench", "bench-reference"
            cluster.kubectl("create", "namespace", ns)
            cluster.kubectl("create", "namespace", ref_ns)
            for n in (ns, ref_ns):  # the manifest's pvc:// source
                cluster.kubectl("apply", "-f", "-", stdin=model_volume(n))
            op = OperatorProcess(
                identity,
                log=Path(tmp) / "operator.log",
                args=("--namespace", ns, "--resync-seconds", str(RESYNC_S), "--no-leader-election"),
            )
            op.start()
            try:
                time.sleep(3)  # let kopf start its watches
                before = len(identity.audit_events(user=user))
                start = time.monotonic()
                cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=_manifests(mds), timeout=300)
                eventually(
                    lambda: len(_items(cluster, "deployments", ns)) >= 2 * mds,
                    timeout=600,
                    interval=1,
                    what="every child Deployment",
                )
                t_children = time.monotonic() - start
                eventually(
                    lambda: _ready_count(cluster, ns) == mds, timeout=900, interval=1, what="all Ready"
                )
                t_ready = time.monotonic() - start
                to_ready = identity.audit_events(user=user)[before:]

                idle_start = len(identity.audit_events(user=user))
                time.sleep(RESYNC_S * 2 + 2)
                idle = [
                    e
                    for e in identity.audit_events(user=user)[idle_start:]
                    if e.get("objectRef", {}).get("resource") != "leases"
                ]
                assert op.proc is not None
                peak = _peak_rss_mib(op.proc.pid)
            finally:
                op.stop()

            # Reference: the same Deployments, applied straight, in a namespace nobody reconciles.
            deployments = [_strip(d) for d in _items(cluster, "deployments", ns)]
            start = time.monotonic()
            cluster.kubectl(
                "apply",
                "--server-side",
                "-n",
                ref_ns,
                "-f",
                "-",
                stdin=yaml.safe_dump_all(deployments),
                timeout=300,
            )
            eventually(
                lambda: _available(cluster, ref_ns, len(deployments)),
                timeout=900,
                interval=1,
                what="reference Deployments available",
            )
            t_reference = time.monotonic() - start
    finally:
        kwok.down(NAME, paths=paths)

    verbs = Counter(e["verb"] for e in to_ready)
    idle_verbs = Counter(e["verb"] for e in idle)
    return {
        "mds": mds,
        "nodes": nodes,
        "children_s": t_children,
        "ready_s": t_ready,
        "reference_s": t_reference,
        "ratio": t_ready / t_reference,
        "requests_per_md": len(to_ready) / mds,
        "writes_per_md": sum(n for v, n in verbs.items() if v in WRITES) / mds,
        "resync_requests_per_md": len(idle) / mds / 2,
        "resync_writes": sum(n for v, n in idle_verbs.items() if v in WRITES),
        "peak_rss_mib": peak,
    }, Counter(_what(e) for e in idle if e["verb"] in WRITES)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still tear the cluster down
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mds", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    r, resync_writes = run(mds=args.mds, nodes=args.nodes)
    print(f"operator at scale: {r['mds']:.0f} ModelDeployments on {r['nodes']:.0f} nodes (8 GPUs each)")
    print(f"  all children created   {r['children_s']:7.1f} s")
    print(f"  all Ready              {r['ready_s']:7.1f} s   (goal < 60 s)")
    print(f"  reference (kubectl)    {r['reference_s']:7.1f} s   same Deployments applied straight")
    print(f"  ratio operator/ref     {r['ratio']:7.2f}")
    print(f"  API requests per MD    {r['requests_per_md']:7.1f}   (writes {r['writes_per_md']:.1f})")
    resync = r["resync_requests_per_md"]
    print(f"  requests per resync/MD {resync:7.2f}   writes on resync: {r['resync_writes']:.0f}")
    print(f"  operator peak memory   {r['peak_rss_mib']:7.1f} MiB")
    for what, n in sorted(resync_writes.items()):
        print(f"  resync write: {n} x {what}")


if __name__ == "__main__":
    main()
