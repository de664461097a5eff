"""Host state a real node touches, snapshotted at `up` and put back at `down`: sysctls, iptables
rules and chains, nftables tables, network namespaces, directories the kubelet and containerd
hard-code, cgroups under the node's cgroup root, mounts, containerd shims."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

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
    # set by the harness, so that a Service's reply from a pod on the same bridge passes the
    # host's conntrack (kube-proxy's DNAT is undone there) rather than going straight back
    "net.bridge.bridge-nf-call-iptables",
)
# Paths the kubelet, containerd and libmount hard-code; removed on `down` if they were absent.
# /run/containerd: containerd 2's shims put their sockets in /run/containerd/s whatever `state` is.
HOST_DIRS = ("/var/log/containers", "/run/netns", "/var/lib/cni", "/run/mount", "/run/containerd")
RMTREE_DIRS = ("/var/lib/cni", "/run/containerd")


def iptables_save(cmd: str) -> str:
    if shutil.which(cmd) is None:
        return ""
    return subprocess.run([cmd], capture_output=True, text=True, check=False).stdout


def nft_tables() -> list[str]:
    if shutil.which("nft") is None:
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


# What a real node's processes add to iptables: the kubelet's and kube-proxy's KUBE-* chains, the
# CNI portmap plugin's CNI-HOSTPORT-* and CNI-DN-*, and the harness's fence (node_services) naming
# the pod bridges and address ranges. `down` removes new rules and chains only if they carry one
# of these: other software here (podman's CNI firewall chains, docker) may have added its own.
OUR_CHAINS = ("KUBE-", "CNI-HOSTPORT", "CNI-DN-")
OURS = (*OUR_CHAINS, "kmoe-br", "198.18.", "198.19.")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def host_snapshot(*, dirs: bool = True) -> dict[str, Any]:
    """What `restore` puts back. dirs=False: leave the hard-coded directories out (kube-proxy and
    CoreDNS start after a node has made them, and must not remove them under its pods)."""
    sysctls = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            sysctls[key] = Path("/proc/sys", *key.split(".")).read_text().strip()
    return {
        "boot_id": boot_id(),
        "sysctls": sysctls,
        "iptables": iptables_save("iptables-save"),
        "ip6tables": iptables_save("ip6tables-save"),
        "nft_tables": nft_tables(),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else None,
        "dirs": {d: os.path.exists(d) for d in HOST_DIRS} if dirs else {},
    }


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup v1 hierarchies and of cgroup2 (hybrid here)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(fields[4]))
    return out


def make_cgroup_root(cgroup_root: str) -> None:
    """The kubelet insists that cgroupRoot exists in every hierarchy; cpuset needs cpus/mems."""
    for h in cgroup_hierarchies():
        d = h / cgroup_root.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def remove_cgroup_root(cgroup_root: str) -> list[str]:
    """Kill what is left in the node's cgroups (only its pods' processes are there), remove them;
    return the ones that would not go."""
    left = []
    for h in cgroup_hierarchies():
        top = h / cgroup_root.lstrip("/")
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
                    try:  # the cgroup may go while we read it
                        procs = (d / "cgroup.procs").read_text().split()
                    except OSError:
                        procs = []
                    for pid in procs:  # only processes of this node's pods are in here
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    time.sleep(0.1)
            if d.exists():
                left.append(str(d))
    return left


def mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(mp)
    return out


def pids_of(exe: Path) -> list[int]:
    """Processes running the binary `exe` (containerd shims outlive containerd)."""
    shim = str(exe)
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(p / "exe") == shim:
                    pids.append(int(p.name))
    return pids


def undo_iptables(save_cmd: str, before: str) -> None:
    """Delete the rules and user-defined chains that were not there before and are ours (OURS)."""
    cmd = save_cmd.replace("-save", "")
    now = iptables_save(save_cmd)
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
            chain = line[1:].split()[0]
            if line.split()[1] == "-" and chain.startswith(OUR_CHAINS):  # user-defined, ours
                new_chains.append((table, chain))
        elif line.startswith("-A ") and (table, line) not in before_rules and any(m in line for m in OURS):
            subprocess.run([cmd, "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True, check=False)
    for t, c in new_chains:
        subprocess.run([cmd, "-t", t, "-F", c], capture_output=True, check=False)
    for t, c in new_chains:
        subprocess.run([cmd, "-t", t, "-X", c], capture_output=True, check=False)


def _empty_nft_table(table: str) -> bool:
    """True if nftables table `table` ("ip filter") has chains but no rule (what iptables-nft leaves)."""
    out = subprocess.run(["nft", "list", "table", *table.split()], capture_output=True, text=True).stdout
    heads = ("table ", "chain ", "type ", "policy ", "}", "flags ")
    return not any(line.strip() and not line.strip().startswith(heads) for line in out.splitlines())


def set_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


def restore(state: dict[str, Any], *, owned_prefix: Path) -> list[str]:
    """Put the host back as `state` (host_snapshot() at `up`) found it: iptables rules and chains,
    nftables tables, sysctls, directories. `owned_prefix`: the run directory whose files the
    kubelet linked from /var/log/containers. Returns what could not be put back."""
    problems: list[str] = []
    if state.get("boot_id", boot_id()) != boot_id():
        # A snapshot from before a reboot: what it did not have may be anybody's by now.
        return ["host state snapshot is from before a reboot: iptables, sysctls and dirs left as they are"]
    undo_iptables("iptables-save", state["iptables"])
    undo_iptables("ip6tables-save", state["ip6tables"])
    for t in nft_tables():
        if t not in state["nft_tables"] and _empty_nft_table(t):
            subprocess.run(["nft", "delete", *t.split()], capture_output=True, check=False)
    for key, value in state["sysctls"].items():
        with contextlib.suppress(OSError):
            set_sysctl(key, value)
    logs = Path("/var/log/containers")
    if "/var/log/containers" in state["dirs"] and logs.is_dir():
        for link in logs.iterdir():  # the kubelet's symlinks into our podLogsDir
            if link.is_symlink() and os.readlink(link).startswith(str(owned_prefix) + "/"):
                link.unlink()
    for path, existed in state["dirs"].items():
        if existed or not os.path.isdir(path):
            continue
        if path in RMTREE_DIRS:
            shutil.rmtree(path, ignore_errors=True)  # created by this node, holds only its files
        else:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        if os.path.exists(path):
            problems.append(f"{path} not empty: {os.listdir(path)}")
    return problems


def new_cni_netns(state: dict[str, Any]) -> list[str]:
    """Network namespaces the CNI made since `state` (pods' sandboxes)."""
    if not os.path.isdir("/run/netns"):
        return []
    before = set(state.get("netns") or [])
    return [f"/run/netns/{n}" for n in os.listdir("/run/netns") if n not in before and n.startswith("cni-")]
