"""Start and stop a local control plane: kwokctl (binary runtime) + GPU nodes + LeaderWorkerSet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import build
from e2e.cluster.handle import Cluster
from e2e.cluster.lws import install_lws
from e2e.cluster.nodes import GpuNodes, node_manifests
from e2e.cluster.procs import stop_pidfile
from kubemoe_runtime.pod.ports import free_port


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "kubemoe"
    nodes: GpuNodes = field(default_factory=GpuNodes)
    extra_nodes: tuple[GpuNodes, ...] = ()
    """More node pools (other GPU types, CPU-only nodes), each with its own name prefix."""
    with_lws: bool = True
    real_nodes: int = 0
    """Real nodes (kubelet + containerd, see realnode.py) beside the kwok nodes; lifecycle.up starts them."""


def run_root() -> Path:
    return build.cache_root().parent.parent / "clusters"


def cluster_dir(name: str) -> Path:
    return run_root() / name


def kubeconfig_path(name: str) -> Path:
    return cluster_dir(name) / "kubeconfig.yaml"


def _log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Requests by service accounts (the operator under test runs as one) at Metadata level: enough
# to count an identity's API calls by verb; system components are left out to keep it small.
# Writes of ModelDeployment status by anyone at Request level: the body and the field manager
# (in requestURI) of every status write, to tell who wrote which condition.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "Request",
            "verbs": ["patch", "update"],
            "resources": [{"group": "kubemoe.io", "resources": ["modeldeployments/status"]}],
        },
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}


def audit_log_path(name: str) -> Path:
    return cluster_dir(name) / "kwok" / "clusters" / name / "logs" / "audit.log"


# The address ranges real nodes use (node_config.py); kwok-only clusters get them too, so that a
# cluster is the same API whichever nodes it has.
SERVICE_CIDR = "198.19.0.0/16"
API_SERVICE_IP = "198.19.0.1"
REAL_NODE0_IP = "198.18.0.1"


def components_patches(*, real_nodes: bool) -> list[dict[str, Any]]:
    """kwokctl component flags. kwok-controller fakes only the nodes annotated
    ``kwok.x-k8s.io/node=fake`` (``nodes.py`` sets it; by default it would fake a real node's
    status and pods too). The API server: Services in SERVICE_CIDR; kubelets reached at their
    InternalIP; the namespace-level PodNodeSelector and PodTolerationRestriction admission plugins
    (tests pin a namespace's pods, the router's too, to the real nodes); and with real nodes, an
    advertised address that pods reach (node 0's bridge address) for the `kubernetes` Service, on
    which it listens too: every address (that bridge does not exist yet), while node_services
    fences its port to loopback and the pod bridges. etcd and the rest stay on 127.0.0.1."""

    def arg(key: str, value: str, *, override: bool = False) -> dict[str, Any]:
        # override=True only replaces an argument kwokctl already passes (else it is dropped).
        return {"key": key, "value": value, "override": override}

    apiserver = [
        arg("service-cluster-ip-range", SERVICE_CIDR),
        arg("kubelet-preferred-address-types", "InternalIP"),
        arg("enable-admission-plugins", "PodNodeSelector,PodTolerationRestriction"),
    ]
    if real_nodes:
        apiserver.append(arg("advertise-address", REAL_NODE0_IP))
        apiserver.append(arg("bind-address", "0.0.0.0", override=True))
    return [
        {
            "name": "kwok-controller",
            "extraArgs": [
                arg("manage-all-nodes", "false", override=True),
                arg("manage-nodes-with-annotation-selector", "kwok.x-k8s.io/node=fake"),
            ],
        },
        {"name": "kube-apiserver", "extraArgs": apiserver},
    ]


def _kwokctl_config(paths: build.Paths, *, audit_policy: Path) -> dict[str, Any]:
    b = paths.bin
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "kubeVersion": build.KUBE_VERSION,
            "etcdVersion": build.ETCD_VERSION.lstrip("v"),
            "kwokVersion": build.KWOK_VERSION,
            "bindAddress": "127.0.0.1",  # every component; see components_patches for the API server
            "kubeApiserverCertSANs": [
                API_SERVICE_IP,
                REAL_NODE0_IP,
                "kubernetes.default.svc",
                "kubernetes.default",
            ],
            "kubeApiserverPort": free_port(),
            "kubeApiserverBinary": str(b / "kube-apiserver"),
            "kubeControllerManagerBinary": str(b / "kube-controller-manager"),
            "kubeSchedulerBinary": str(b / "kube-scheduler"),
            "kubectlBinary": str(b / "kubectl"),
            "etcdBinary": str(b / "etcd"),
            "kwokControllerBinary": str(b / "kwok"),
            "quietPull": True,
            "kubeAuditPolicy": str(audit_policy),
        },
    }


def _kwokctl(
    paths: build.Paths, name: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["KWOK_WORKDIR"] = str(cluster_dir(name) / "kwok")
    env["PATH"] = f"{paths.bin}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(paths.bin / "kwokctl"), "--name", name, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def create_control_plane(paths: build.Paths, name: str, *, real_nodes: bool = False) -> Cluster:
    """`kwokctl create cluster` (binary runtime, the audit policy and component patches above)
    under cluster_dir(name); the control plane only, no nodes."""
    root = cluster_dir(name)
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    cfg = _kwokctl_config(paths, audit_policy=policy)
    cfg["componentsPatches"] = components_patches(real_nodes=real_nodes)
    (root / "kwokctl.yaml").write_text(yaml.safe_dump(cfg))
    kubeconfig = kubeconfig_path(name)
    proc = _kwokctl(
        paths,
        name,
        "create",
        "cluster",
        "--config",
        str(root / "kwokctl.yaml"),
        "--runtime",
        "binary",
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        "5m",
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kwokctl create cluster failed:\n{proc.stderr[-6000:]}")
    return Cluster(kubeconfig=kubeconfig, bin_dir=paths.bin, audit_log=audit_log_path(name))


def up(config: ClusterConfig, *, paths: build.Paths | None = None) -> Cluster:
    """Create the cluster (replacing a stale one of the same name) and return a handle to it."""
    paths = paths or build.ensure_built()
    down(config.name, paths=paths)
    root = cluster_dir(config.name)
    t0 = time.monotonic()
    _log(f"starting control plane {config.name!r} (kube {build.KUBE_VERSION}) ...")
    cluster = create_control_plane(paths, config.name, real_nodes=config.real_nodes > 0)
    _log(f"control plane up in {time.monotonic() - t0:.1f}s")

    cluster.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(
            [n for pool in (config.nodes, *config.extra_nodes) for n in node_manifests(pool)]
        ),
    )
    cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=120s")
    n = config.nodes
    _log(f"{n.count} GPU nodes ready ({n.gpus_per_node} x {n.gpu_product} each)")

    if config.with_lws:
        install_lws(cluster, config_dir=paths.lws_config, run_dir=root, binary=paths.bin / "lws-controller")
        _log("LeaderWorkerSet controller and webhooks ready")
    _log(f"cluster ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={cluster.kubeconfig}")
    return cluster


def down(name: str, *, paths: build.Paths | None = None) -> None:
    """Stop the LWS controller and every kwokctl component; remove the cluster's files."""
    root = cluster_dir(name)
    if not root.exists():
        return
    stop_pidfile(root / "lws-controller.pid")
    paths = paths or build.Paths(build.cache_root())
    if (paths.bin / "kwokctl").exists() and (root / "kwok").exists():
        proc = _kwokctl(
            paths, name, "delete", "cluster", "--kubeconfig", str(kubeconfig_path(name)), timeout=120
        )
        if proc.returncode != 0:
            _log(f"kwokctl delete cluster: {proc.stderr.strip()[-2000:]}")
    shutil.rmtree(root, ignore_errors=True)


def existing(name: str) -> Cluster | None:
    kc = kubeconfig_path(name)
    if not kc.exists():
        return None
    return Cluster(kubeconfig=kc, bin_dir=build.Paths(build.cache_root()).bin, audit_log=audit_log_path(name))
