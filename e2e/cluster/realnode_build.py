"""Build what a real node needs, once, behind a stamp file (see realnode.py).

Everything lands in ``~/.cache/kubemoe/realnode/<kube version>/bin``:
kubelet and kube-proxy (from ``k8s.io/kubernetes`` at the API server's release, through a wrapper
module like ``build.build_kube``), CoreDNS (``github.com/coredns/coredns``), crictl, containerd
2.x + containerd-shim-runc-v2 + ctr (from
``github.com/containerd/containerd/v2``), and the CNI plugins bridge, host-local, loopback and
portmap (from ``github.com/containernetworking/plugins``, into ``bin/cni``).
runc, iptables and busybox-static come from Debian (``apt-get install``): see ``DEBIAN_PACKAGES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster import build

CONTAINERD_VERSION = "v2.4.2"
CNI_PLUGINS_VERSION = "v1.10.0"
CRI_TOOLS_VERSION = "v1.37.0"
COREDNS_VERSION = "v1.14.7"
CNI_PLUGINS = {
    "bridge": "plugins/main/bridge",
    "loopback": "plugins/main/loopback",
    "host-local": "plugins/ipam/host-local",
    "portmap": "plugins/meta/portmap",
}
# runc: Debian's (1.1.5); runc's Go module is not served by the proxy here.
# nftables: only for `nft delete table` on `down`, to remove the empty tables iptables-nft leaves.
DEBIAN_PACKAGES = ("runc", "iptables", "nftables", "busybox-static")
# The same tags containerd's Makefile uses for a static build; no cgo is needed (no btrfs/zfs).
NODE_KUBE_COMMANDS = ("kubelet", "kube-proxy")
CONTAINERD_TAGS = "urfave_cli_no_docs osusergo netgo static_build"


@dataclass(frozen=True)
class Paths(build.Paths):
    """build.Paths (bin, src, stamp) plus the CNI plugins' folder."""

    @property
    def cni_bin(self) -> Path:
        return self.root / "bin" / "cni"


def cache_root() -> Path:
    return build.cache_root().parent.parent / "realnode" / build.KUBE_VERSION


def wanted_stamp() -> dict[str, str]:
    return {
        "kube": build.KUBE_VERSION,
        "containerd": CONTAINERD_VERSION,
        "cni-plugins": CNI_PLUGINS_VERSION,
        "cri-tools": CRI_TOOLS_VERSION,
        "coredns": COREDNS_VERSION,
        "debian": " ".join(DEBIAN_PACKAGES),
    }


def nice_env() -> dict[str, str]:
    env = build.go_env()
    env.setdefault("GOMAXPROCS", str(os.cpu_count() or 2))
    return env


def go(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    # nice: the other engineers' e2e suites share these 2 cores.
    return build.run(["nice", "-n", "10", "go", *args], cwd=cwd, env=env or nice_env())


def build_kube_commands(paths: Paths) -> None:
    """kubelet and kube-proxy from k8s.io/kubernetes at the API server's release."""
    info = build.module_info("k8s.io/kubernetes", build.KUBE_VERSION)
    staging = build.staging_modules(Path(info["GoMod"]).read_text())
    published = "v0." + build.KUBE_VERSION.split(".", 1)[1]
    src = paths.src / "kubelet"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        build.wrapper_go_mod(
            name="kubelet",
            require={"k8s.io/kubernetes": build.KUBE_VERSION},
            replace=dict.fromkeys(staging, published),
        )
    )
    pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in NODE_KUBE_COMMANDS]
    go(["get", *[f"{p}@{build.KUBE_VERSION}" for p in pkgs]], cwd=src)
    for c, pkg in zip(NODE_KUBE_COMMANDS, pkgs, strict=True):
        go(["build", "-trimpath", "-ldflags", build.kube_ldflags(), "-o", str(paths.bin / c), pkg], cwd=src)


def go_build_module(paths: Paths, *, name: str, module: str, version: str, pkg: str, ldflags: str) -> None:
    """`go build` package `pkg` of `module`@`version` (through a wrapper module) into bin/`name`."""
    src = paths.src / name
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(build.wrapper_go_mod(name=name, require={module: version}, replace={}))
    go(["get", f"{pkg}@{version}"], cwd=src)
    go(["build", "-trimpath", "-ldflags", ldflags, "-o", str(paths.bin / name), pkg], cwd=src)


def build_coredns(paths: Paths) -> None:
    """CoreDNS (its default plugin set has `kubernetes`), so Service and pod names resolve."""
    module = "github.com/coredns/coredns"
    go_build_module(
        paths, name="coredns", module=module, version=COREDNS_VERSION, pkg=module, ldflags="-s -w"
    )


def build_containerd(paths: Paths) -> None:
    module = "github.com/containerd/containerd/v2"
    src = paths.src / "containerd"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        build.wrapper_go_mod(name="containerd", require={module: CONTAINERD_VERSION}, replace={})
    )
    cmds = ("containerd", "containerd-shim-runc-v2", "ctr")
    go(["get", *[f"{module}/cmd/{c}@{CONTAINERD_VERSION}" for c in cmds]], cwd=src)
    ldflags = (
        f"-s -w -X {module}/version.Version={CONTAINERD_VERSION} "
        f"-X {module}/version.Package=github.com/containerd/containerd/v2 -extldflags -static"
    )
    for c in cmds:
        tags = CONTAINERD_TAGS + (" no_grpc" if c == "containerd-shim-runc-v2" else "")
        go(
            [
                "build",
                "-trimpath",
                "-tags",
                tags,
                "-ldflags",
                ldflags,
                "-o",
                str(paths.bin / c),
                f"{module}/cmd/{c}",
            ],
            cwd=src,
        )


def build_cni(paths: Paths) -> None:
    module = "github.com/containernetworking/plugins"
    src = paths.src / "cni"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        build.wrapper_go_mod(name="cni", require={module: CNI_PLUGINS_VERSION}, replace={})
    )
    go(["get", *[f"{module}/{p}@{CNI_PLUGINS_VERSION}" for p in CNI_PLUGINS.values()]], cwd=src)
    paths.cni_bin.mkdir(parents=True, exist_ok=True)
    ldflags = f"-s -w -X {module}/pkg/utils/buildversion.BuildVersion={CNI_PLUGINS_VERSION}"
    for name, pkg in CNI_PLUGINS.items():
        go(
            ["build", "-trimpath", "-ldflags", ldflags, "-o", str(paths.cni_bin / name), f"{module}/{pkg}"],
            cwd=src,
        )


# The sandbox ("pause") image: no registry is reachable, so a tiny static Go program stands in for
# registry.k8s.io/pause. PID 1 of the pod: it reaps orphans and exits on SIGTERM/SIGINT.
PAUSE_GO = """package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
"""


def build_pause(paths: Paths) -> None:
    src = paths.src / "pause"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text("module kubemoe.local/pause\n\ngo 1.26\n")
    (src / "main.go").write_text(PAUSE_GO)
    go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(paths.bin / "pause"), "."], cwd=src)


def build_crictl(paths: Paths) -> None:
    """crictl: to inspect the node and to stop/remove pod sandboxes (CNI teardown) on `down`."""
    module = "sigs.k8s.io/cri-tools"
    ldflags = f"-s -w -X {module}/pkg/version.Version={CRI_TOOLS_VERSION}"
    go_build_module(
        paths,
        name="crictl",
        module=module,
        version=CRI_TOOLS_VERSION,
        pkg=f"{module}/cmd/crictl",
        ldflags=ldflags,
    )


def install_debian(paths: Paths) -> None:
    build.apt_install(DEBIAN_PACKAGES, tools=("runc", "iptables", "nft", "busybox"))


STEPS = {
    "debian": install_debian,
    "pause": build_pause,
    "cni": build_cni,
    "containerd": build_containerd,
    "kube": build_kube_commands,
    "coredns": build_coredns,
    "crictl": build_crictl,
}


def ensure_built(paths: Paths | None = None) -> Paths:
    """Build whatever is missing of the real node (build.run_steps)."""
    return build.run_steps(paths or Paths(cache_root()), want=wanted_stamp(), steps=STEPS, what="realnode")


if __name__ == "__main__":
    print(ensure_built().bin)
