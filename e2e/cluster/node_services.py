"""What a real node needs of the cluster besides the control plane, run as host processes (one
each per cluster, however many real nodes): kube-proxy, so ClusterIP Services route, and CoreDNS,
so Service, headless-Service and pod names resolve (the kube-dns Service at CLUSTER_DNS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from e2e.cluster import certs, node_host, realnode_build
from e2e.cluster.handle import Cluster
from e2e.cluster.kwok import SERVICE_CIDR
from e2e.cluster.node_config import (
    POD_NETWORK,
    RealNode,
    corefile,
    kube_dns_objects,
    kube_proxy_config,
    services_dir,
)
from e2e.cluster.procs import alive, start_daemon, stop_pidfile, wait_for
from e2e.cluster.realnode import api_server_url, kwok_pki, log
from kubemoe_runtime.pod.ports import free_port


def _kubeconfig(cluster_name: str, cluster: Cluster, user: str, group: str | None = None) -> Path:
    d = services_dir(cluster_name)
    return certs.client_kubeconfig(
        d / f"{user.replace(':', '-')}.kubeconfig",
        server=api_server_url(cluster),
        pki=kwok_pki(cluster_name),
        user=user,
        group=group,
    )


def fence_rules(api_port: int) -> list[tuple[str, list[str]]]:
    """iptables rules (chain, rule) that keep the pod network on this machine: pods' packets to an
    address no bridge or Service has are refused rather than routed out of the default route (and
    none come in from outside), host packets to a Service address nothing answers are refused, the
    nodes' own addresses (kubelets, CoreDNS) and the API server's port (bound to every address: see
    kwok.components_patches) take connections from loopback and the pod bridges only. In order,
    first to last."""
    port = ["-p", "tcp", "--dport", str(api_port)]
    return [
        ("FORWARD", ["-i", "kmoe-br+", "!", "-o", "kmoe-br+", "-j", "REJECT"]),
        ("FORWARD", ["-o", "kmoe-br+", "!", "-i", "kmoe-br+", "-j", "DROP"]),
        ("OUTPUT", ["-d", SERVICE_CIDR, "-j", "REJECT"]),
        ("INPUT", ["-d", POD_NETWORK, "-i", "lo", "-j", "ACCEPT"]),
        ("INPUT", ["-d", POD_NETWORK, "-i", "kmoe-br+", "-j", "ACCEPT"]),
        ("INPUT", ["-d", POD_NETWORK, "-j", "DROP"]),
        ("INPUT", [*port, "-i", "lo", "-j", "ACCEPT"]),
        ("INPUT", [*port, "-i", "kmoe-br+", "-j", "ACCEPT"]),
        ("INPUT", [*port, "-j", "DROP"]),
    ]


def _fence(api_port: int, *, on: bool) -> None:
    rules = fence_rules(api_port)
    if on:
        for chain, rule in reversed(rules):  # -I: each goes first, so insert the last one first
            subprocess.run(["iptables", "-I", chain, *rule], check=True, capture_output=True)
        subprocess.run(
            ["ip", "route", "replace", "unreachable", POD_NETWORK], check=True, capture_output=True
        )
    else:
        for chain, rule in rules:
            subprocess.run(["iptables", "-D", chain, *rule], check=False, capture_output=True)
        subprocess.run(
            ["ip", "route", "delete", "unreachable", POD_NETWORK], check=False, capture_output=True
        )


def up_services(cluster_name: str, cluster: Cluster) -> None:
    """Start kube-proxy and CoreDNS (after node 0: CoreDNS listens on its bridge address)."""
    bins = realnode_build.ensure_built()
    down_services(cluster_name)
    d = services_dir(cluster_name)
    d.mkdir(parents=True)
    t0 = time.monotonic()
    (d / "state.json").write_text(json.dumps(node_host.host_snapshot(dirs=False), indent=1))
    api_port = urllib.parse.urlsplit(api_server_url(cluster)).port or 443
    (d / "api-port").write_text(str(api_port))
    _fence(api_port, on=True)
    # kube-proxy as the built-in system:kube-proxy user (bound to system:node-proxier).
    proxy_kc = _kubeconfig(cluster_name, cluster, "system:kube-proxy")
    config = kube_proxy_config(
        cluster_name, kubeconfig=proxy_kc, healthz_port=free_port(), metrics_port=free_port()
    )
    (d / "kube-proxy.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{bins.bin}{os.pathsep}{os.environ.get('PATH', '')}")
    start_daemon(
        [str(bins.bin / "kube-proxy"), f"--config={d / 'kube-proxy.yaml'}", "--v=2"],
        log=d / "kube-proxy.log",
        pidfile=d / "kube-proxy.pid",
        env=env,
    )
    healthz = config["healthzBindAddress"]

    def proxy_healthy() -> bool:
        if not alive(int((d / "kube-proxy.pid").read_text())):
            raise RuntimeError(f"kube-proxy exited:\n{(d / 'kube-proxy.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://{healthz}/livez", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for("kube-proxy healthy", proxy_healthy, 60, d / "kube-proxy.log")
    # CoreDNS reads Services, EndpointSlices, Namespaces and Pods: a user bound to `view` would
    # not do (no cluster scope); the harness's admin kubeconfig is as much as it needs and more.
    dns_kc = d / "coredns.kubeconfig"
    shutil.copy(cluster.kubeconfig, dns_kc)
    (d / "Corefile").write_text(corefile(listen=RealNode(cluster_name).node_ip, kubeconfig=dns_kc))
    start_daemon(
        [str(bins.bin / "coredns"), "-conf", str(d / "Corefile")],
        log=d / "coredns.log",
        pidfile=d / "coredns.pid",
        env=env,
    )

    def dns_serving() -> bool:
        if not alive(int((d / "coredns.pid").read_text())):
            raise RuntimeError(f"CoreDNS exited:\n{(d / 'coredns.log').read_text()[-4000:]}")
        return "CoreDNS-" in (d / "coredns.log").read_text()

    wait_for("CoreDNS serving", dns_serving, 60, d / "coredns.log")
    cluster.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(kube_dns_objects()))
    log(f"kube-proxy and CoreDNS up in {time.monotonic() - t0:.1f}s")


def down_services(cluster_name: str) -> list[str]:
    """Stop CoreDNS and kube-proxy, remove kube-proxy's iptables rules, put back the host."""
    d = services_dir(cluster_name)
    if not d.exists():
        return []
    if (d / "api-port").exists():
        _fence(int((d / "api-port").read_text()), on=False)
    stop_pidfile(d / "coredns.pid", grace=5)
    stop_pidfile(d / "kube-proxy.pid", grace=10)
    bins = realnode_build.Paths(realnode_build.cache_root())
    if (bins.bin / "kube-proxy").exists():
        subprocess.run([str(bins.bin / "kube-proxy"), "--cleanup"], capture_output=True, check=False)
    problems: list[str] = []
    if (d / "state.json").exists():
        problems += node_host.restore(json.loads((d / "state.json").read_text()), owned_prefix=d)
    shutil.rmtree(d, ignore_errors=True)
    return problems
