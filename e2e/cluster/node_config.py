"""A real node's layout (addresses, names, directories) and the configuration files of its
containerd, CNI, kubelet; and of the cluster-wide kube-proxy and CoreDNS that serve every real node.

Addresses live only on bridges and in network namespaces the harness makes, in the benchmarking
ranges: node i's pods in 198.18.i.0/24 with the node at 198.18.i.1 (the bridge's address: the
kubelet refuses a loopback node IP and this kernel has no dummy links), Services in 198.19.0.0/16.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.cluster import build, realnode_build
from e2e.cluster.kwok import SERVICE_CIDR
from e2e.cluster.node_images import PAUSE_IMAGE

POD_NETWORK = "198.18.0.0/16"
CLUSTER_DNS = "198.19.0.10"
CLUSTER_DOMAIN = "cluster.local"
REAL_NODE_LABEL = "kubemoe.io/real-node"
MAX_REAL_NODES = 8


def machine_lock() -> Path:
    """Held by whoever runs real nodes here. Not under $HOME: the bridges, iptables rules and address
    ranges are the machine's, whichever user or HOME (a CI clone, a cold run) brings nodes up."""
    shared = Path("/run/lock")
    return (shared if shared.is_dir() else Path(tempfile.gettempdir())) / "kubemoe-real-nodes.lock"


def run_root() -> Path:
    # Not inside kwok's cluster dir: kwok.down rmtree()s that, and these dirs hold mounts.
    return build.cache_root().parent.parent / "realnodes"


@dataclass(frozen=True)
class RealNode:
    cluster: str
    index: int = 0

    @property
    def node_name(self) -> str:
        return f"{self.cluster}-real-{self.index}"

    @property
    def run_dir(self) -> Path:
        return run_root() / self.node_name

    @property
    def pod_cidr(self) -> str:
        return f"198.18.{self.index}.0/24"

    @property
    def node_ip(self) -> str:
        return f"198.18.{self.index}.1"  # node 0's: kwok.REAL_NODE0_IP, the API server's advertised one

    @property
    def bridge(self) -> str:
        return f"kmoe-br{self.index}"  # <= 15 characters

    @property
    def cgroup_root(self) -> str:
        return f"/kubemoe-{self.node_name}"

    @property
    def sock(self) -> Path:
        return self.run_dir / "containerd" / "containerd.sock"


def services_dir(cluster: str) -> Path:
    """kube-proxy's and CoreDNS's files: one of each per cluster, serving all its real nodes."""
    return run_root() / f"{cluster}-services"


def containerd_config(node: RealNode, bins: realnode_build.Paths) -> str:
    d = node.run_dir
    runc = shutil.which("runc") or "/usr/sbin/runc"
    return f"""version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"
temp = "{d}/containerd/tmp"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{node.sock}"

[ttrpc]
  address = "{node.sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  # Every registry is 127.0.0.1:9 (nothing listens): an image that was not imported fails to pull
  # at once, with no lookup of kubemoe.local or anything else through this machine's resolver.
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/containerd/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  # This machine's bounding set lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below
  # its own (0) and every sandbox failed with "nsexec: failed to update /proc/self/oom_score_adj:
  # Permission denied" / "can't get final child's PID from pipe: EOF". Clamp instead.
  restrict_oom_score_adj = true
  enable_selinux = false
  cdi_spec_dirs = []
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{bins.cni_bin}"]
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"""


REGISTRY_HOSTS = """# every registry: nothing is pulled from off this machine (images are imported)
server = "http://127.0.0.1:9"
"""


def cni_config(node: RealNode) -> dict[str, Any]:
    net = ipaddress.ip_network(node.pod_cidr)
    return {
        "cniVersion": "1.0.0",
        "name": "kubemoe-realnode",  # one network; each node its own bridge and /24
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": True,
                "ipMasq": False,  # nothing is to leave this machine
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.run_dir / "cni" / "ipam"),
                    "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
                    "routes": [{"dst": POD_NETWORK}, {"dst": SERVICE_CIDR}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
        ],
    }


def kubelet_config(node: RealNode, *, port: int, healthz_port: int) -> dict[str, Any]:
    d = node.run_dir
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # 1.35+ refuses cgroup v1 by default
        "cgroupDriver": "cgroupfs",  # no systemd here (PID 1 is not systemd)
        "cgroupRoot": node.cgroup_root,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": f"unix://{node.sock}",
        "address": node.node_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(d / "pki" / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(d / "pki" / "kubelet-serving.key"),
        # kwokctl's API server presents no kubelet client certificate: allow anonymous on 127.0.0.1.
        "authentication": {
            "anonymous": {"enabled": True},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(d / "pki" / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [CLUSTER_DNS],
        "clusterDomain": CLUSTER_DOMAIN,
        # Pods see only cluster DNS: no search domains or resolvers of this machine's.
        "resolvConf": str(d / "resolv.conf"),
        "podLogsDir": str(d / "pod-logs"),
        "volumePluginDir": str(d / "volume-plugins"),
        "failSwapOn": False,
        "maxPods": 32,
        "podCIDR": node.pod_cidr,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # No eviction on disk ("0%": off): reclaiming disk, the kubelet deletes images, and this node's
        # are imported, never pullable (imagePullPolicy: Never). On 2026-12-02 a CI's shared disk dipped
        # under 1% free for two minutes; the kubelet deleted the 3.6 GB runtime image, and every later
        # real-node test failed on ErrImageNeverPull until the run timed out.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "0%", "imagefs.available": "0%"},
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
        "registerWithTaints": [{"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }


def kube_proxy_config(
    cluster: str, *, kubeconfig: Path, healthz_port: int, metrics_port: int
) -> dict[str, Any]:
    """One kube-proxy for every real node: they all share this host's network stack, and two
    would fight over the same iptables chains. iptables mode; it changes no sysctl it need not."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": RealNode(cluster).node_name,
        "mode": "iptables",
        "clusterCIDR": POD_NETWORK,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # NodePorts only on the pod bridges: nothing listens on this machine's own interfaces.
        "nodePortAddresses": [POD_NETWORK],
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s"},
        # 0: leave nf_conntrack_max and the TCP timeouts as the host has them
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def corefile(*, listen: str, kubeconfig: Path) -> str:
    """Cluster names only: with no `forward`, a pod can ask nothing of this machine's resolver."""
    return f""".:53 {{
    bind {listen}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loop
}}
"""


def kube_dns_objects() -> list[dict[str, Any]]:
    """The kube-dns Service at CLUSTER_DNS and its endpoints: CoreDNS on node 0's address (a host
    process, not a pod, so the EndpointSlice is written here rather than by a selector)."""
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "clusterIP": CLUSTER_DNS,
                "ports": [{"name": n, "port": 53, "targetPort": 53, "protocol": p} for n, p in ports],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-host",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "kubemoe-e2e",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [RealNode("").node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": n, "port": 53, "protocol": p} for n, p in ports],
        },
    ]
