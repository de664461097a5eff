"""The real node (kubelet + containerd + runc + CNI, kube-proxy, CoreDNS) runs pods as containers:
probes through the pod network, logs, exec, port-forward, Services and cluster DNS. kwok's pods
never land on it."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import yaml

from e2e.cluster import kwok, lifecycle, realnode
from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import CLUSTER_DNS, REAL_NODE_LABEL
from e2e.cluster.node_images import BUSYBOX_IMAGE
from e2e.conftest import E2E_CLUSTER_NAME, E2E_REAL_NODES, pinned_to_real_nodes
from e2e.real_pods import busybox_pod
from e2e.waiting import eventually

WEB = (
    "mkdir -p /tmp/w && echo hi from $(hostname) > /tmp/w/index.html && echo uid=$(id -u) && "
    "exec httpd -f -p 8080 -h /tmp/w"
)


def _apply(cluster: Cluster, ns: str, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(objs))


def _exec(cluster: Cluster, ns: str, pod: str, script: str) -> str:
    p = cluster.kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script, check=False, timeout=60)
    return p.stdout + p.stderr


def test_a_pod_runs_as_a_container(cluster: Cluster, real_namespace: str) -> None:
    ns = real_namespace
    web = busybox_pod("web", WEB)
    # The kubelet probes the pod's IP through the bridge: Ready proves the CNI path.
    web["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/", "port": 8080},
        "periodSeconds": 1,
    }
    _apply(cluster, ns, web)
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/web", "--timeout=90s", timeout=120)
    pod = json.loads(cluster.kubectl("get", "-n", ns, "pod", "web", "-o", "json").stdout)
    node = json.loads(cluster.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
    assert node["metadata"]["labels"][REAL_NODE_LABEL] == "true"
    assert pod["status"]["podIP"].startswith("198.18.")
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    assert "uid=65532" in cluster.kubectl("logs", "-n", ns, "web").stdout
    assert _exec(cluster, ns, "web", "cat /tmp/w/index.html").strip() == "hi from web"
    with (
        cluster.port_forward("pod/web", 8080, namespace=ns) as port,
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r,
    ):
        assert r.read().decode().strip() == "hi from web"


def test_services_and_cluster_dns(cluster: Cluster, real_namespace: str) -> None:
    ns = real_namespace
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "webs"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]},
    }
    web = busybox_pod("web", WEB, labels={"app": "web"}, hostname="web-0", subdomain="webs")
    _apply(cluster, ns, svc, headless, web, busybox_pod("client", "exec sleep 3600"))
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod", "--all", "--timeout=90s", timeout=120)
    cluster_ip = cluster.kubectl("get", "-n", ns, "svc", "web", "-o", "jsonpath={.spec.clusterIP}").stdout
    pod_ip = cluster.kubectl("get", "-n", ns, "pod", "web", "-o", "jsonpath={.status.podIP}").stdout
    assert cluster_ip.startswith("198.19.")

    def answers(pod: str, script: str, want: str) -> None:
        """kube-proxy's and CoreDNS's views follow the EndpointSlices a moment later: poll."""
        eventually(
            lambda: want in _exec(cluster, ns, pod, script), timeout=30, what=f"{script!r} -> {want!r}"
        )

    resolv = _exec(cluster, ns, "client", "cat /etc/resolv.conf")
    assert f"nameserver {CLUSTER_DNS}" in resolv
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in resolv
    assert f"Address: {cluster_ip}" in _exec(cluster, ns, "client", "nslookup web")
    assert f"Address: {pod_ip}" in _exec(cluster, ns, "client", f"nslookup web-0.webs.{ns}.svc.cluster.local")
    assert "Address: 198.19.0.1" in _exec(
        cluster, ns, "client", "nslookup kubernetes.default.svc.cluster.local"
    )
    # Only cluster names: a pod can ask nothing of this machine's resolver.
    assert "SERVFAIL" in _exec(cluster, ns, "client", "nslookup example.com")

    get = 'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 {} {}'
    # kube-proxy: a ClusterIP Service from another pod, and from the backend pod itself (hairpin)
    answers("client", get.format(cluster_ip, 80), "hi from web-0")
    answers("web", get.format(cluster_ip, 80), "hi from web-0")
    # the `kubernetes` Service reaches the API server (it answers plain HTTP with a 400)
    answers("client", get.format("198.19.0.1", 443), "HTTPS server")
    # an address nothing in the cluster has is refused here, not routed off this machine
    assert "HTTPS server" not in _exec(cluster, ns, "client", get.format("198.18.200.1", 443))


def test_kwok_pods_stay_off_the_real_node(cluster: Cluster, namespace: str) -> None:
    if E2E_REAL_NODES == 0:
        pytest.skip("KUBEMOE_E2E_REAL_NODES=0: no real node in this cluster")
    (real,) = json.loads(
        cluster.kubectl("get", "nodes", "-l", f"{REAL_NODE_LABEL}=true", "-o", "json").stdout
    )["items"][:1]
    taints = real["spec"].get("taints", [])
    assert {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"} in taints, taints
    # A pod that names the real node but does not tolerate its taint is not scheduled there.
    pinned = busybox_pod(
        "pinned", "sleep 1", nodeSelector={"kubernetes.io/hostname": real["metadata"]["name"]}
    )
    _apply(cluster, namespace, pinned)
    eventually(
        lambda: (
            "Unschedulable"
            in cluster.kubectl(
                "get", "-n", namespace, "pod", "pinned", "-o", "jsonpath={.status.conditions[*].reason}"
            ).stdout
        ),
        timeout=60,
        what="the pod pinned to the real node Unschedulable",
    )
    gpu = busybox_pod("gpu", "sleep 1")
    gpu["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    plain = busybox_pod("plain", "sleep 1")
    _apply(cluster, namespace, gpu, plain)
    for name in ("gpu", "plain"):
        cluster.kubectl(
            "wait", "-n", namespace, "--for=condition=PodScheduled", f"pod/{name}", "--timeout=60s"
        )
        node = cluster.kubectl("get", "-n", namespace, "pod", name, "-o", "jsonpath={.spec.nodeName}").stdout
        labels = json.loads(cluster.kubectl("get", "node", node, "-o", "jsonpath={.metadata.labels}").stdout)
        assert labels.get("type") == "kwok", (name, node)


def test_one_cluster_with_real_nodes_per_machine(cluster: Cluster) -> None:
    if E2E_REAL_NODES == 0:
        pytest.skip("KUBEMOE_E2E_REAL_NODES=0: no real node in this cluster")
    with pytest.raises(RuntimeError, match="one cluster with real nodes per machine"):
        lifecycle.up(kwok.ClusterConfig(name="kubemoe-second", real_nodes=1))
    assert kwok.existing("kubemoe-second") is None


def test_an_image_not_imported_is_never_pulled_from_off_this_machine(
    cluster: Cluster, real_namespace: str
) -> None:
    ns = real_namespace
    pod = busybox_pod("ghost", "true")
    pod["spec"]["containers"][0]["image"] = "kubemoe.local/never-imported:1"
    pod["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    _apply(cluster, ns, pod)
    message = eventually(
        lambda: (
            cluster.kubectl(
                "get",
                "-n",
                ns,
                "pod",
                "ghost",
                "-o",
                "jsonpath={.status.containerStatuses[0].state.waiting.message}",
            ).stdout
        ),
        timeout=60,
        what="the pull of an image nobody imported failing",
    )
    assert "127.0.0.1:9" in message, message  # the only registry the node knows: nothing listens


def test_an_image_gone_from_the_node_is_imported_again(cluster: Cluster) -> None:
    """The node's images are imported, never pulled: one deleted after `up` (by hand, or by a kubelet
    reclaiming disk) is imported again before the next real-node test, not met as ErrImageNeverPull."""
    if E2E_REAL_NODES == 0:
        pytest.skip("KUBEMOE_E2E_REAL_NODES=0: no real node in this cluster")
    node = lifecycle.real_nodes_of(E2E_CLUSTER_NAME)[0]
    realnode.ctr(node, "images", "rm", BUSYBOX_IMAGE)
    assert not realnode.has_image(node, BUSYBOX_IMAGE)
    with pinned_to_real_nodes(cluster) as ns:
        assert realnode.has_image(node, BUSYBOX_IMAGE)
        _apply(cluster, ns, busybox_pod("back", "echo back; sleep 30"))
        cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/back", "--timeout=60s", timeout=90)
        assert cluster.kubectl("logs", "-n", ns, "back").stdout.strip() == "back"


def test_the_kubelet_never_deletes_images_to_reclaim_disk(cluster: Cluster) -> None:
    """Disk-pressure eviction would delete the imported images (no registry to pull them back from):
    the node's kubelet runs with it off, as its configz reports."""
    if E2E_REAL_NODES == 0:
        pytest.skip("KUBEMOE_E2E_REAL_NODES=0: no real node in this cluster")
    node = lifecycle.real_nodes_of(E2E_CLUSTER_NAME)[0]
    raw = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{node.node_name}/proxy/configz").stdout
    config = json.loads(raw)["kubeletconfig"]
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["evictionHard"]["nodefs.available"] == "0%"
    assert config["evictionHard"]["imagefs.available"] == "0%"
