"""The real node's layout and configuration (e2e/cluster/node_config.py, kwok.components_patches):
addresses only in the benchmarking ranges, cluster DNS that forwards nothing off this machine, one
kube-proxy that leaves the host's conntrack sysctls alone."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.cluster import build, kwok, lifecycle
from e2e.cluster.kwok import SERVICE_CIDR
from e2e.cluster.node_config import (
    CLUSTER_DNS,
    POD_NETWORK,
    RealNode,
    cni_config,
    corefile,
    kube_dns_objects,
    kube_proxy_config,
)

BENCHMARKING = ipaddress.ip_network("198.18.0.0/15")


@pytest.mark.parametrize("index", [0, 1, 7])
def test_node_addresses_are_in_the_benchmarking_range(index: int) -> None:
    node = RealNode("c", index)
    net = ipaddress.ip_network(node.pod_cidr)
    assert net.subnet_of(ipaddress.ip_network(POD_NETWORK))  # type: ignore[arg-type]
    assert ipaddress.ip_address(node.node_ip) == net.network_address + 1
    assert len(node.bridge) <= 15  # Linux interface names
    for n in (POD_NETWORK, SERVICE_CIDR):
        assert ipaddress.ip_network(n).subnet_of(BENCHMARKING)  # type: ignore[arg-type]
    assert ipaddress.ip_address(CLUSTER_DNS) in ipaddress.ip_network(SERVICE_CIDR)


def test_nodes_do_not_share_bridges_or_subnets() -> None:
    nodes = [RealNode("c", i) for i in range(4)]
    assert len({n.bridge for n in nodes}) == len({n.pod_cidr for n in nodes}) == 4
    conf = cni_config(nodes[1])["plugins"][0]
    assert conf["bridge"] == nodes[1].bridge
    assert conf["ipMasq"] is False  # nothing is to leave this machine
    assert conf["ipam"]["ranges"][0][0]["subnet"] == nodes[1].pod_cidr


def test_cluster_dns_answers_cluster_names_only() -> None:
    text = corefile(listen=RealNode("c").node_ip, kubeconfig=Path("/k"))
    assert "forward" not in text  # no upstream: a pod asks nothing of this machine's resolver
    assert f"bind {RealNode('c').node_ip}" in text
    svc, slice_ = kube_dns_objects()
    assert svc["spec"]["clusterIP"] == CLUSTER_DNS
    assert slice_["endpoints"][0]["addresses"] == [kwok.REAL_NODE0_IP]


def test_kube_proxy_changes_no_host_sysctl_it_need_not() -> None:
    config = kube_proxy_config("c", kubeconfig=Path("/k"), healthz_port=1, metrics_port=2)
    assert config["conntrack"]["maxPerCore"] == 0
    assert config["iptables"]["localhostNodePorts"] is False  # would set route_localnet
    assert config["nodePortAddresses"] == [POD_NETWORK]


def test_the_api_server_is_reachable_from_pods_only_with_real_nodes() -> None:
    def apiserver_args(real: bool) -> dict[str, str]:
        (api,) = [p for p in kwok.components_patches(real_nodes=real) if p["name"] == "kube-apiserver"]
        return {a["key"]: a["value"] for a in api["extraArgs"]}

    assert apiserver_args(True)["advertise-address"] == kwok.REAL_NODE0_IP
    assert "advertise-address" not in apiserver_args(False)
    assert apiserver_args(False)["service-cluster-ip-range"] == SERVICE_CIDR


def test_real_node_count_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"real_nodes must be 0\.\.8"):
        lifecycle.up(kwok.ClusterConfig(name="never-started", real_nodes=9))


def test_a_cluster_name_has_one_user_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Locks of their own: an e2e session may hold the real ones meanwhile.
    monkeypatch.setattr(kwok, "run_root", lambda: tmp_path / "clusters")
    monkeypatch.setattr(lifecycle, "machine_lock", lambda: tmp_path / "real-nodes.lock")
    # .ci/run's KUBEMOE_E2E_LOCK_WAIT_S must not make the second claim wait: its holder is this process.
    monkeypatch.setenv("KUBEMOE_E2E_LOCK_WAIT_S", "1800")
    in_use = pytest.raises(RuntimeError, match="in use by another e2e session")
    with lifecycle.claimed("claim-test"), in_use, lifecycle.claimed("claim-test"):
        pass
    with lifecycle.claimed("claim-test"):  # free again once the first user is done
        pass
    busy = pytest.raises(RuntimeError, match="real nodes are in use")
    with lifecycle.claimed("claim-a", real_nodes=True), busy, lifecycle.claimed("claim-b", real_nodes=True):
        pass


def test_a_run_told_to_wait_gets_the_cluster_once_its_user_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KUBEMOE_E2E_LOCK_WAIT_S (.ci/run's): a second run waits for the first rather than failing."""
    monkeypatch.setattr(kwok, "run_root", lambda: tmp_path / "clusters")
    monkeypatch.setattr(lifecycle, "machine_lock", lambda: tmp_path / "real-nodes.lock")
    monkeypatch.setenv("KUBEMOE_E2E_LOCK_WAIT_S", "30")
    (tmp_path / "clusters").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "clusters" / "wait-test.lock"), "2"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    t0 = time.monotonic()
    with lifecycle.claimed("wait-test"):
        waited = time.monotonic() - t0
    assert holder.wait(timeout=30) == 0
    assert 1.0 <= waited < 30, waited
    monkeypatch.setenv("KUBEMOE_E2E_LOCK_WAIT_S", "0")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "clusters" / "wait-test.lock"), "5"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(RuntimeError, match="in use by another e2e session"), lifecycle.claimed("wait-test"):
        pass
    holder.kill()
    holder.wait()


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(str(os.getpid())); f.flush()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_the_real_node_lock_is_the_machines_not_the_homes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cold CI run with HOME=$(mktemp -d) and a clone with the usual HOME share one set of bridges.
    from e2e.cluster.node_config import machine_lock

    first, home = machine_lock(), Path.home()
    monkeypatch.setenv("HOME", "/nonexistent-home")
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")
    assert machine_lock() == first
    assert not first.is_relative_to(home)


def test_the_fence_keeps_the_pod_network_on_this_machine() -> None:
    from e2e.cluster.node_services import fence_rules

    rules = fence_rules(6443)
    # pods' packets to anything but a pod bridge are refused, and none come in from outside
    assert ("FORWARD", ["-i", "kmoe-br+", "!", "-o", "kmoe-br+", "-j", "REJECT"]) in rules
    assert ("FORWARD", ["-o", "kmoe-br+", "!", "-i", "kmoe-br+", "-j", "DROP"]) in rules
    api = [r for c, r in rules if c == "INPUT" and "6443" in r]
    assert [r[-1] for r in api] == ["ACCEPT", "ACCEPT", "DROP"]  # lo, the bridges, then nobody
    assert {r[r.index("-i") + 1] for r in api if "-i" in r} == {"lo", "kmoe-br+"}


def test_only_the_api_server_listens_beyond_loopback() -> None:
    cfg = kwok._kwokctl_config(build.Paths(Path("/x")), audit_policy=Path("/p"))
    assert cfg["options"]["bindAddress"] == "127.0.0.1"  # etcd and the rest, whatever the nodes
    (api,) = [p for p in kwok.components_patches(real_nodes=True) if p["name"] == "kube-apiserver"]
    assert {"key": "bind-address", "value": "0.0.0.0", "override": True} in api["extraArgs"]
