"""A real node beside the kwok nodes: kubelet + containerd 2 + runc + CNI (prototype, issue 13 §1).

    python -m e2e.cluster.realnode up   [--name kubemoe-realnode]   # control plane + 1 real node
    python -m e2e.cluster.realnode smoke [--name ...]               # busybox pod: Running, Ready, logs
    python -m e2e.cluster.realnode down  [--name ...]               # stop all, leave the host as found
    python -m e2e.cluster.realnode all   [--name ...]               # up, smoke, down (~15 s warm)

The control plane is the same kwokctl binary runtime as ``kwok.up``, with three patches:
kwok-controller manages only nodes annotated ``kwok.x-k8s.io/node=fake`` (``nodes.py`` already sets
it; with the default ``--manage-all-nodes=true`` kwok would fake the real node's status and pods),
the Service range is 198.19.0.0/16, and the API server reaches kubelets by InternalIP, which is
NODE_IP (198.18.0.1, on the pod bridge; the kubelet refuses a loopback node IP).

Host state touched, and undone by ``down`` (a snapshot is taken at ``up`` in ``state.json``):
a bridge (``kmoe-br0``, made here with NODE_IP) and veths made by the CNI bridge plugin, pod netns
under /run/netns, iptables chains and rules the kubelet (KUBE-FIREWALL, canaries) and portmap
create, the empty nftables tables iptables-nft leaves, the sysctls the kubelet
(``vm.overcommit_memory``, ``kernel.panic``, ...) and the bridge plugin (``net.ipv4.ip_forward``)
set, cgroups under ``/<cgroup_root>`` in every v1 hierarchy, mounts under the run directory,
/var/log/containers (the kubelet hard-codes it) and /run/containerd (containerd 2's shim sockets).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2e.cluster import build, kwok, realnode_build
from e2e.cluster.handle import Cluster
from e2e.cluster.lws import install_lws
from e2e.cluster.nodes import GpuNodes, node_manifests
from e2e.cluster.procs import alive, free_port, start_daemon, stop_pidfile

POD_CIDR = "198.18.0.0/24"  # one node's share of 198.18.0.0/16
# The node's own address: the pod bridge's gateway address. The kubelet refuses a loopback
# node IP ("failed to validate nodeIP: nodeIP can't be loopback address") and this kernel has
# no dummy links, so the harness creates the bridge itself, with this address, before the
# kubelet starts; the API server (bound to 127.0.0.1) reaches the kubelet here, locally.
NODE_IP = str(ipaddress.ip_network(POD_CIDR).network_address + 1)
SERVICE_CIDR = "198.19.0.0/16"
CLUSTER_DNS = "198.19.0.10"
PAUSE_IMAGE = "kubemoe.local/pause:1"
BUSYBOX_IMAGE = "kubemoe.local/busybox:1"
REAL_NODE_LABEL = "kubemoe.io/real-node"
SYSCTLS = (
    # set by the kubelet (pkg/kubelet/cm: setupKernelTunables, protectKernelDefaults=false)
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    # set by the CNI bridge plugin (isGateway)
    "net.ipv4.ip_forward",
)
# Paths the kubelet, containerd and libmount hard-code; removed on `down` if they were absent.
# /run/containerd: containerd 2's shims put their sockets in /run/containerd/s whatever `state` is.
HOST_DIRS = ("/var/log/containers", "/run/netns", "/var/lib/cni", "/run/mount", "/run/containerd")
RMTREE_DIRS = ("/var/lib/cni", "/run/containerd")


def _log(msg: str) -> None:
    print(f"[realnode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RealNode:
    cluster: str = "kubemoe-realnode"
    index: int = 0

    @property
    def node_name(self) -> str:
        return f"{self.cluster}-real-{self.index}"

    @property
    def run_dir(self) -> Path:
        # Not inside kwok's cluster dir: kwok.down rmtree()s that, and this dir holds mounts.
        return build.cache_root().parent.parent / "realnodes" / self.node_name

    @property
    def bridge(self) -> str:
        return f"kmoe-br{self.index}"  # <= 15 characters

    @property
    def cgroup_root(self) -> str:
        return f"/kubemoe-{self.node_name}"

    @property
    def sock(self) -> Path:
        return self.run_dir / "containerd" / "containerd.sock"


# --------------------------------------------------------------------------- control plane


def _kwok_patches() -> list[dict[str, Any]]:
    def arg(key: str, value: str, *, override: bool = False) -> dict[str, Any]:
        # override=True only replaces an argument kwokctl already passes (else it is dropped).
        return {"key": key, "value": value, "override": override}

    return [
        {
            "name": "kwok-controller",
            "extraArgs": [
                arg("manage-all-nodes", "false", override=True),
                arg("manage-nodes-with-annotation-selector", "kwok.x-k8s.io/node=fake"),
            ],
        },
        {
            "name": "kube-apiserver",
            "extraArgs": [
                arg("service-cluster-ip-range", SERVICE_CIDR),
                arg("kubelet-preferred-address-types", "InternalIP"),
            ],
        },
    ]


def up_control_plane(name: str, *, kwok_nodes: GpuNodes | None = None, with_lws: bool = False) -> Cluster:
    """kwok.up() with the patches above."""
    paths = build.ensure_built()
    kwok.down(name, paths=paths)
    root = kwok.cluster_dir(name)
    t0 = time.monotonic()
    cluster = kwok.create_control_plane(paths, name, components_patches=_kwok_patches())
    _log(f"control plane {name!r} up in {time.monotonic() - t0:.1f}s")
    pool = kwok_nodes or GpuNodes(count=1)
    cluster.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(node_manifests(pool)))
    cluster.kubectl("wait", "--for=condition=Ready", "node", "-l", "type=kwok", "--timeout=120s")
    if with_lws:
        install_lws(cluster, config_dir=paths.lws_config, run_dir=root, binary=paths.bin / "lws-controller")
    return cluster


def kwok_pki(name: str) -> Path:
    return kwok.cluster_dir(name) / "kwok" / "clusters" / name / "pki"


def api_server_url(cluster: Cluster) -> str:
    kc = yaml.safe_load(cluster.kubeconfig.read_text())
    return str(kc["clusters"][0]["cluster"]["server"])


# --------------------------------------------------------------------------- certificates


def _sign(
    pki: Path, subject: x509.Name, *, client: bool, ips: tuple[str, ...] = (), dns: tuple[str, ...] = ()
) -> tuple[bytes, bytes]:
    with warnings.catch_warnings():  # kwokctl's CA has a non-positive serial number
        warnings.simplefilter("ignore")
        ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if ips or dns:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.DNSName(d) for d in dns]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_kubelet_credentials(node: RealNode, cluster: Cluster) -> Path:
    """A kubeconfig for system:node:<name> (group system:nodes), signed by kwok's CA; and the
    kubelet's serving certificate for 127.0.0.1."""
    pki = kwok_pki(node.cluster)
    d = node.run_dir / "pki"
    d.mkdir(parents=True, exist_ok=True)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node.node_name}"),
        ]
    )
    crt, key = _sign(pki, subject, client=True)
    (d / "kubelet-client.crt").write_bytes(crt)
    (d / "kubelet-client.key").write_bytes(key)
    crt, key = _sign(
        pki,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node.node_name)]),
        client=False,
        ips=(NODE_IP, "127.0.0.1"),
        dns=(node.node_name,),
    )
    (d / "kubelet-serving.crt").write_bytes(crt)
    (d / "kubelet-serving.key").write_bytes(key)
    shutil.copy(pki / "ca.crt", d / "ca.crt")
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": api_server_url(cluster), "certificate-authority": str(d / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate": str(d / "kubelet-client.crt"),
                    "client-key": str(d / "kubelet-client.key"),
                },
            }
        ],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = node.run_dir / "kubelet.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


# --------------------------------------------------------------------------- images


def _blob(out: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def _layer(files: dict[str, tuple[bytes, int]], links: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = sorted({str(Path(p).parent) for p in (*files, *links) if str(Path(p).parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            t.addfile(info)
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            t.addfile(info, io.BytesIO(data))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            t.addfile(info)
    return buf.getvalue()


def oci_archive(
    ref: str, files: dict[str, tuple[bytes, int]], links: dict[str, str], config: dict[str, Any]
) -> bytes:
    """A single-layer OCI image layout as a tar stream, named `ref` for `ctr images import`."""
    layer = _layer(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    gz = gzip.compress(layer, mtime=0)
    out_buf = io.BytesIO()
    with tarfile.open(fileobj=out_buf, mode="w") as out:
        layer_digest, layer_size = _blob(out, gz)
        cfg = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
        cfg_digest, cfg_size = _blob(out, cfg)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cfg_digest,
                    "size": cfg_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": layer_size,
                    }
                ],
            }
        ).encode()
        m_digest, m_size = _blob(out, manifest)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": m_digest,
                        "size": m_size,
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                        },
                    }
                ],
            }
        ).encode()
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
    return out_buf.getvalue()


BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "sleep",
    "cat",
    "ls",
    "date",
    "httpd",
    "hostname",
    "ip",
    "wget",
    "id",
    "env",
    "mkdir",
    "touch",
    "ps",
)


def image_archives(bins: realnode_build.Paths) -> dict[str, bytes]:
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    env = ["PATH=/bin"]
    return {
        PAUSE_IMAGE: oci_archive(
            PAUSE_IMAGE,
            {"pause": ((bins.bin / "pause").read_bytes(), 0o755)},
            {},
            {"Entrypoint": ["/pause"], "Env": env, "User": "65535:65535"},
        ),
        BUSYBOX_IMAGE: oci_archive(
            BUSYBOX_IMAGE,
            {"bin/busybox": (busybox, 0o755), "tmp/.keep": (b"", 0o644)},
            {f"bin/{a}": "busybox" for a in BUSYBOX_APPLETS},
            {"Cmd": ["/bin/sh"], "Env": env},
        ),
    }


# --------------------------------------------------------------------------- host snapshot


def _iptables_save(cmd: str) -> str:
    if shutil.which(cmd) is None:
        return ""
    return subprocess.run([cmd], capture_output=True, text=True, check=False).stdout


def _nft_tables() -> list[str]:
    if shutil.which("nft") is None:
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def host_snapshot() -> dict[str, Any]:
    sysctls = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            sysctls[key] = Path("/proc/sys", *key.split(".")).read_text().strip()
    return {
        "sysctls": sysctls,
        "iptables": _iptables_save("iptables-save"),
        "ip6tables": _iptables_save("ip6tables-save"),
        "nft_tables": _nft_tables(),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else None,
        "dirs": {d: os.path.exists(d) for d in HOST_DIRS},
    }


# --------------------------------------------------------------------------- node configuration


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup v1 hierarchies and of cgroup2 (hybrid here)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(fields[4]))
    return out


def make_cgroup_root(node: RealNode) -> None:
    """The kubelet insists that cgroupRoot exists in every hierarchy; cpuset needs cpus/mems."""
    for h in cgroup_hierarchies():
        d = h / node.cgroup_root.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def remove_cgroup_root(node: RealNode) -> list[str]:
    left = []
    for h in cgroup_hierarchies():
        top = h / node.cgroup_root.lstrip("/")
        if not top.exists():
            continue
        for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    procs = (d / "cgroup.procs").read_text().split() if (d / "cgroup.procs").exists() else []
                    for pid in procs:  # only processes of this node's pods are in here
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    time.sleep(0.1)
            if d.exists():
                left.append(str(d))
    return left


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


def cni_config(node: RealNode) -> dict[str, Any]:
    net = ipaddress.ip_network(POD_CIDR)
    return {
        "cniVersion": "1.0.0",
        "name": "kubemoe-realnode",
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
                    "routes": [{"dst": str(net)}, {"dst": SERVICE_CIDR}],
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
        "address": NODE_IP,
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
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(d / "pod-logs"),
        "volumePluginDir": str(d / "volume-plugins"),
        "failSwapOn": False,
        "maxPods": 32,
        "podCIDR": POD_CIDR,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
        "registerWithTaints": [{"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }


# --------------------------------------------------------------------------- up / down


def _ctr(node: RealNode, bins: realnode_build.Paths, *args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        [str(bins.bin / "ctr"), "--address", str(node.sock), "--namespace", "k8s.io", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {proc.stderr.decode()[-2000:]}")
    return proc.stdout.decode()


def _wait(what: str, check: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def up_node(node: RealNode, cluster: Cluster) -> float:
    """Start containerd and the kubelet for `node`; return seconds until the Node is Ready."""
    bins = realnode_build.ensure_built()
    down_node(node, cluster=None)
    d = node.run_dir
    d.mkdir(parents=True)
    t0 = time.monotonic()
    (d / "state.json").write_text(json.dumps(host_snapshot(), indent=1))
    for sub in ("containerd", "cni/net.d", "cni/ipam", "pod-logs", "volume-plugins", "kubelet"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "containerd.toml").write_text(containerd_config(node, bins))
    (d / "cni/net.d/10-kubemoe.conflist").write_text(json.dumps(cni_config(node), indent=1))
    kubeconfig = write_kubelet_credentials(node, cluster)
    kport, hport = free_port(), free_port()
    (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(node, port=kport, healthz_port=hport)))
    make_cgroup_root(node)
    net = ipaddress.ip_network(POD_CIDR)
    for cmd in (
        ["ip", "link", "add", node.bridge, "type", "bridge"],
        ["ip", "addr", "add", f"{NODE_IP}/{net.prefixlen}", "dev", node.bridge],
        ["ip", "link", "set", node.bridge, "up"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)

    env = dict(os.environ)
    env["PATH"] = f"{bins.bin}{os.pathsep}{env.get('PATH', '')}"
    start_daemon(
        [str(bins.bin / "containerd"), "--config", str(d / "containerd.toml")],
        log=d / "containerd.log",
        pidfile=d / "containerd.pid",
        env=env,
    )
    _wait("containerd socket", node.sock.exists, 30, d / "containerd.log")
    for ref, data in image_archives(bins).items():
        _ctr(node, bins, "images", "import", "--platform", "linux/amd64", "-", stdin=data)
        _log(f"imported {ref} ({len(data) // 1024} KiB)")
    start_daemon(
        [
            str(bins.bin / "kubelet"),
            "--config",
            str(d / "kubelet.yaml"),
            "--kubeconfig",
            str(kubeconfig),
            "--root-dir",
            str(d / "kubelet"),
            "--cert-dir",
            str(d / "pki"),
            "--hostname-override",
            node.node_name,
            "--node-ip",
            NODE_IP,
            "--node-labels",
            f"{REAL_NODE_LABEL}=true,type=real,kubemoe.io/accelerator=cpu",
            "--v",
            "2",
        ],
        log=d / "kubelet.log",
        pidfile=d / "kubelet.pid",
        env=env,
    )

    def ready() -> bool:
        p = cluster.kubectl(
            "get",
            "node",
            node.node_name,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
        )
        if not alive(int((d / "kubelet.pid").read_text())):
            raise RuntimeError(
                f"kubelet exited; see {d / 'kubelet.log'}\n{(d / 'kubelet.log').read_text()[-4000:]}"
            )
        return p.stdout.strip() == "True"

    _wait(f"node {node.node_name} Ready", ready, 180, d / "kubelet.log")
    secs = time.monotonic() - t0
    _log(f"node {node.node_name} Ready in {secs:.1f}s")
    return secs


def _mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(mp)
    return out


def _shim_pids(bins: realnode_build.Paths) -> list[int]:
    shim = str(bins.bin / "containerd-shim-runc-v2")
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(p / "exe") == shim:
                    pids.append(int(p.name))
    return pids


def _undo_iptables(save_cmd: str, before: str) -> None:
    """Delete rules and chains that were not there before (kubelet canaries, CNI portmap)."""
    cmd = save_cmd.replace("-save", "")
    now = _iptables_save(save_cmd)
    if not now or now == before:
        return
    before_rules, before_chains = set(), set()
    table = ""
    for line in before.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            before_chains.add((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            before_rules.add((table, line))
    new_chains: list[tuple[str, str]] = []
    for line in now.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and (table, line[1:].split()[0]) not in before_chains:
            if line.split()[1] == "-":  # user-defined (built-ins have a policy)
                new_chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A ") and (table, line) not in before_rules:
            subprocess.run([cmd, "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True, check=False)
    for t, c in new_chains:
        subprocess.run([cmd, "-t", t, "-F", c], capture_output=True, check=False)
    for t, c in new_chains:
        subprocess.run([cmd, "-t", t, "-X", c], capture_output=True, check=False)


def down_node(node: RealNode, *, cluster: Cluster | None) -> list[str]:
    """Stop the node and undo every host change it made; return what could not be undone."""
    d = node.run_dir
    if not d.exists():
        return []
    bins = realnode_build.Paths(realnode_build.cache_root())
    state = json.loads((d / "state.json").read_text()) if (d / "state.json").exists() else None
    crictl = [str(bins.bin / "crictl"), "--runtime-endpoint", f"unix://{node.sock}", "--timeout", "20s"]
    if cluster is not None:
        # Let the kubelet stop its pods itself first (CNI DEL, volume unmounts, log symlinks).
        cluster.kubectl(
            "delete",
            "pods",
            "--all-namespaces",
            "--field-selector",
            f"spec.nodeName={node.node_name}",
            "--grace-period=1",
            "--wait=true",
            "--timeout=60s",
            check=False,
            timeout=90,
        )
        cluster.kubectl("delete", "node", node.node_name, "--ignore-not-found", "--wait=false", check=False)
    stop_pidfile(d / "kubelet.pid", grace=15)
    # Pod sandboxes: stopping them through the CRI runs the CNI DEL (veth, IPAM) and removes the netns.
    if node.sock.exists() and (d / "containerd.pid").exists():
        subprocess.run([*crictl, "stopp", *_crictl_ids(crictl)], capture_output=True, check=False)
        subprocess.run([*crictl, "rmp", "--force", "--all"], capture_output=True, check=False)
        with contextlib.suppress(RuntimeError):
            for line in _ctr(node, bins, "tasks", "ls", "-q").split():
                with contextlib.suppress(RuntimeError):
                    _ctr(node, bins, "tasks", "kill", "-s", "SIGKILL", line)
    stop_pidfile(d / "containerd.pid", grace=15)
    for pid in _shim_pids(bins):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    problems: list[str] = []
    # Mounts: pod netns files, overlay rootfs, shm, tmpfs volumes; deepest first.
    netns_new = []
    if state is not None and os.path.isdir("/run/netns"):
        netns_new = [f"/run/netns/{n}" for n in os.listdir("/run/netns") if n not in (state["netns"] or [])]
        netns_new = [n for n in netns_new if n.startswith("/run/netns/cni-")]
    for mp in sorted(set(_mounts_under((str(d), *netns_new))), key=len, reverse=True):
        if subprocess.run(["umount", "-l", mp], capture_output=True, check=False).returncode:
            problems.append(f"umount {mp}")
    for n in netns_new:
        with contextlib.suppress(OSError):
            os.unlink(n)
    subprocess.run(["ip", "link", "delete", node.bridge], capture_output=True, check=False)
    problems += [f"cgroup {c}" for c in remove_cgroup_root(node)]
    if state is not None:
        _undo_iptables("iptables-save", state["iptables"])
        _undo_iptables("ip6tables-save", state["ip6tables"])
        for t in _nft_tables():
            if t not in state["nft_tables"]:
                subprocess.run(["nft", "delete", *t.split()], capture_output=True, check=False)
        for key, value in state["sysctls"].items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", *key.split(".")).write_text(value)
        for path, existed in state["dirs"].items():
            if not existed and os.path.isdir(path):
                if path == "/var/log/containers":
                    for link in Path(path).iterdir():  # the kubelet's symlinks into our podLogsDir
                        if link.is_symlink() and os.readlink(link).startswith(str(d) + "/"):
                            link.unlink()
                if path in RMTREE_DIRS:
                    shutil.rmtree(path, ignore_errors=True)  # created by this node, holds only its files
                else:
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
                if os.path.exists(path):
                    problems.append(f"{path} not empty: {os.listdir(path)}")
    if not _mounts_under((str(d),)):
        shutil.rmtree(d, ignore_errors=True)
    else:
        problems.append(f"mounts left under {d}")
    return problems


def _crictl_ids(crictl: list[str]) -> list[str]:
    p = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True, check=False)
    return p.stdout.split()


# --------------------------------------------------------------------------- smoke check


def smoke_pod(node: RealNode) -> dict[str, Any]:
    script = (
        "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && "
        "echo hello from $(hostname) uid=$(id -u) && ip -4 addr show eth0 | grep inet; "
        "i=0; while true; do echo tick $i; i=$((i+1)); sleep 5; done"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "busybox-smoke", "namespace": "default"},
        "spec": {
            "nodeSelector": {REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "busybox",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                    "ports": [{"containerPort": 8080}],
                    # the kubelet probes the pod IP through the bridge: proves the CNI path
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 2},
                    "livenessProbe": {
                        "exec": {"command": ["cat", "/tmp/www/index.html"]},
                        "periodSeconds": 5,
                    },
                    "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                }
            ],
        },
    }


def smoke(node: RealNode, cluster: Cluster) -> dict[str, Any]:
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(smoke_pod(node)))
    cluster.kubectl("wait", "--for=condition=Ready", "pod/busybox-smoke", "--timeout=120s", timeout=150)
    ready_s = time.monotonic() - t0
    pod = json.loads(cluster.kubectl("get", "pod", "busybox-smoke", "-o", "json").stdout)
    time.sleep(1)
    logs = cluster.kubectl("logs", "busybox-smoke").stdout
    exec_out = cluster.kubectl("exec", "busybox-smoke", "--", "cat", "/tmp/www/index.html", check=False)
    result = {
        "ready_s": round(ready_s, 1),
        "phase": pod["status"]["phase"],
        "podIP": pod["status"].get("podIP"),
        "node": pod["spec"]["nodeName"],
        "logs": logs,
        "exec": (exec_out.stdout + exec_out.stderr).strip(),
    }
    cluster.kubectl("delete", "pod", "busybox-smoke", "--wait=true", "--timeout=60s", check=False, timeout=90)
    result["deleted_s"] = round(time.monotonic() - t0 - ready_s, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster.realnode", description=__doc__)
    parser.add_argument("--name", default="kubemoe-realnode")
    parser.add_argument("cmd", choices=("up", "smoke", "down", "all"), help="all = up, smoke, down")
    args = parser.parse_args(argv)
    node = RealNode(cluster=args.name)
    rc = 0
    try:
        if args.cmd in ("up", "all"):
            up_node(node, up_control_plane(args.name))
            print(f"KUBECONFIG={kwok.kubeconfig_path(args.name)}")
        if args.cmd in ("smoke", "all"):
            existing = kwok.existing(args.name)
            if existing is None:
                raise SystemExit(f"no cluster {args.name!r}")
            result = smoke(node, existing)
            print(json.dumps(result, indent=1))
            ok = result["phase"] == "Running" and "hello from" in result["logs"] and result["exec"] == "ok"
            rc = 0 if ok else 1
    finally:
        if args.cmd in ("down", "all"):
            problems = down_node(node, cluster=kwok.existing(args.name))
            kwok.down(args.name)
            print(json.dumps({"down": problems if problems else "ok"}))
            rc = rc or (1 if problems else 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
