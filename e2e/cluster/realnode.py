"""A real node beside the kwok nodes: kubelet + containerd 2 + runc + the CNI bridge (issue 13).

`up_node` starts containerd and a kubelet that registers node i of a cluster (labelled and tainted
as a CPU node: see `node_labels`), on its own bridge and /24 (node_config); `down_node` stops them
and puts the host back as it found it (node_host). The cluster-wide kube-proxy and CoreDNS are in
node_services; `lifecycle.up(..., real_nodes=N)` puts it all together.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from e2e.cluster import certs, kwok, node_host, realnode_build
from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import (
    REAL_NODE_LABEL,
    REGISTRY_HOSTS,
    RealNode,
    cni_config,
    containerd_config,
    kubelet_config,
)
from e2e.cluster.node_images import image_archives
from e2e.cluster.procs import alive, start_daemon, stop_pidfile, wait_for
from kubemoe_runtime.pod.ports import free_port


def log(msg: str) -> None:
    print(f"[realnode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def node_labels() -> dict[str, str]:
    """What a real node is: a CPU node (kubemoe's CPU accelerator) that kwok's GPU pods never
    reach (they select GPU products) and that takes only pods tolerating REAL_NODE_LABEL."""
    return {REAL_NODE_LABEL: "true", "type": "real", "kubemoe.io/accelerator": "cpu"}


def kwok_pki(name: str) -> Path:
    return kwok.cluster_dir(name) / "kwok" / "clusters" / name / "pki"


def api_server_url(cluster: Cluster) -> str:
    kc = yaml.safe_load(cluster.kubeconfig.read_text())
    return str(kc["clusters"][0]["cluster"]["server"])


def write_kubelet_credentials(node: RealNode, cluster: Cluster) -> Path:
    """A kubeconfig for system:node:<name> (group system:nodes), signed by kwok's CA; and the
    kubelet's serving certificate for the node's address."""
    pki = kwok_pki(node.cluster)
    d = node.run_dir / "pki"
    d.mkdir(parents=True, exist_ok=True)
    crt, key = certs.sign_with_ca(
        pki, common_name=node.node_name, client=False, ips=(node.node_ip, "127.0.0.1"), dns=(node.node_name,)
    )
    (d / "kubelet-serving.crt").write_bytes(crt)
    (d / "kubelet-serving.key").write_bytes(key)
    (d / "kubelet-serving.key").chmod(0o600)
    shutil.copy(pki / "ca.crt", d / "ca.crt")
    return certs.client_kubeconfig(
        node.run_dir / "kubelet.kubeconfig",
        server=api_server_url(cluster),
        pki=pki,
        user=f"system:node:{node.node_name}",
        group="system:nodes",
    )


def ctr(node: RealNode, *args: str, stdin: bytes | None = None) -> str:
    bins = realnode_build.Paths(realnode_build.cache_root())
    proc = subprocess.run(
        [str(bins.bin / "ctr"), "--address", str(node.sock), "--namespace", "k8s.io", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {proc.stderr.decode()[-2000:]}")
    return proc.stdout.decode()


def import_image(node: RealNode, archive: Path | bytes) -> None:
    """`ctr images import` an OCI archive (a path, streamed; or bytes) into the node's containerd."""
    if isinstance(archive, bytes):
        ctr(node, "images", "import", "--platform", "linux/amd64", "-", stdin=archive)
        return
    ctr(node, "images", "import", "--platform", "linux/amd64", str(archive))


def has_image(node: RealNode, ref: str) -> bool:
    """Whether `ref` is in the node's containerd (an image imported once may have been deleted since)."""
    return ref in ctr(node, "images", "ls", "-q").split()


def restore_own_images(node: RealNode) -> list[str]:
    """Import again the node's own images (pause, busybox) that are gone from it; return their refs."""
    archives = image_archives(realnode_build.Paths(realnode_build.cache_root()))
    have = set(ctr(node, "images", "ls", "-q").split())
    gone = [ref for ref in archives if ref not in have]
    for ref in gone:
        import_image(node, archives[ref])
        log(f"imported {ref} into {node.node_name} again: it was gone")
    return gone


def up_node(node: RealNode, cluster: Cluster) -> float:
    """Start containerd and the kubelet for `node`; return seconds until the Node is Ready."""
    bins = realnode_build.ensure_built()
    down_node(node, cluster=None)
    d = node.run_dir
    if len(f"{node.sock}.ttrpc") > 107:  # sun_path: containerd would fail with a bare EINVAL
        raise RuntimeError(f"{node.sock}: too long a socket path; use a shorter cluster name or cache dir")
    d.mkdir(parents=True)
    t0 = time.monotonic()
    (d / "state.json").write_text(json.dumps(node_host.host_snapshot(), indent=1))
    for sub in ("containerd", "cni/net.d", "cni/ipam", "pod-logs", "volume-plugins", "kubelet"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "containerd.toml").write_text(containerd_config(node, bins))
    (d / "containerd/certs.d/_default").mkdir(parents=True)
    (d / "containerd/certs.d/_default/hosts.toml").write_text(REGISTRY_HOSTS)
    (d / "cni/net.d/10-kubemoe.conflist").write_text(json.dumps(cni_config(node), indent=1))
    (d / "resolv.conf").write_text("")  # the kubelet adds clusterDNS and the search domains
    kubeconfig = write_kubelet_credentials(node, cluster)
    kport, hport = free_port(), free_port()
    (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(node, port=kport, healthz_port=hport)))
    node_host.make_cgroup_root(node.cgroup_root)
    net = ipaddress.ip_network(node.pod_cidr)
    for cmd in (
        ["ip", "link", "add", node.bridge, "type", "bridge"],
        ["ip", "addr", "add", f"{node.node_ip}/{net.prefixlen}", "dev", node.bridge],
        ["ip", "link", "set", node.bridge, "up"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    node_host.set_sysctl("net.bridge.bridge-nf-call-iptables", "1")

    env = dict(os.environ)
    env["PATH"] = f"{bins.bin}{os.pathsep}{env.get('PATH', '')}"
    start_daemon(
        [str(bins.bin / "containerd"), "--config", str(d / "containerd.toml")],
        log=d / "containerd.log",
        pidfile=d / "containerd.pid",
        env=env,
    )
    wait_for("containerd socket", node.sock.exists, 30, d / "containerd.log")
    for ref, data in image_archives(bins).items():
        import_image(node, data)
        log(f"imported {ref} ({len(data) // 1024} KiB)")
    labels = ",".join(f"{k}={v}" for k, v in node_labels().items())
    start_daemon(
        [
            str(bins.bin / "kubelet"),
            f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'pki'}",
            f"--hostname-override={node.node_name}",
            f"--node-ip={node.node_ip}",
            f"--node-labels={labels}",
            "--v=2",
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

    wait_for(f"node {node.node_name} Ready", ready, 180, d / "kubelet.log")
    secs = time.monotonic() - t0
    log(f"node {node.node_name} Ready in {secs:.1f}s")
    return secs


def down_node(node: RealNode, *, cluster: Cluster | None) -> list[str]:
    """Stop the node and undo every host change it made; return what could not be undone."""
    d = node.run_dir
    if not d.exists():
        return []
    bins = realnode_build.Paths(realnode_build.cache_root())
    state = json.loads((d / "state.json").read_text()) if (d / "state.json").exists() else None
    crictl = [str(bins.bin / "crictl"), "--runtime-endpoint", f"unix://{node.sock}", "--timeout", "20s"]
    if cluster is not None:
        # Let the kubelet stop its pods itself first (CNI DEL, volume unmounts, log symlinks);
        # if it cannot in time, the CRI calls below stop them.
        with contextlib.suppress(subprocess.TimeoutExpired):
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
            cluster.kubectl(
                "delete", "node", node.node_name, "--ignore-not-found", "--wait=false", check=False
            )
    stop_pidfile(d / "kubelet.pid", grace=15)
    # Pod sandboxes: stopping them through the CRI runs the CNI DEL (veth, IPAM) and removes the netns.
    if node.sock.exists() and (d / "containerd.pid").exists():
        subprocess.run([*crictl, "stopp", *_crictl_ids(crictl)], capture_output=True, check=False)
        subprocess.run([*crictl, "rmp", "--force", "--all"], capture_output=True, check=False)
        with contextlib.suppress(RuntimeError):
            for line in ctr(node, "tasks", "ls", "-q").split():
                with contextlib.suppress(RuntimeError):
                    ctr(node, "tasks", "kill", "-s", "SIGKILL", line)
    stop_pidfile(d / "containerd.pid", grace=15)
    for pid in node_host.pids_of(bins.bin / "containerd-shim-runc-v2"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    problems: list[str] = []
    # Mounts: pod netns files, overlay rootfs, shm, tmpfs volumes; deepest first.
    netns_new = node_host.new_cni_netns(state) if state is not None else []
    for mp in sorted(set(node_host.mounts_under((str(d), *netns_new))), key=len, reverse=True):
        if subprocess.run(["umount", "-l", mp], capture_output=True, check=False).returncode:
            problems.append(f"umount {mp}")
    for n in netns_new:
        with contextlib.suppress(OSError):
            os.unlink(n)
    subprocess.run(["ip", "link", "delete", node.bridge], capture_output=True, check=False)
    problems += [f"cgroup {c}" for c in node_host.remove_cgroup_root(node.cgroup_root)]
    if state is not None:
        problems += node_host.restore(state, owned_prefix=d)
    if not node_host.mounts_under((str(d),)):
        shutil.rmtree(d, ignore_errors=True)
    else:
        problems.append(f"mounts left under {d}")
    return problems


def _crictl_ids(crictl: list[str]) -> list[str]:
    p = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True, check=False)
    return p.stdout.split()
