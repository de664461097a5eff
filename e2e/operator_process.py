"""The operator as a real subprocess against a test cluster, and polling helpers for its effects."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster.handle import Cluster
from e2e.waiting import eventually

OPERATOR_NAMESPACE = "kubemoe-system"
"""Where the operator's identity and Leases live in the e2e cluster."""

__all__ = [
    "OperatorProcess",
    "delete_namespace",
    "eventually",
    "get_json",
    "get_or_none",
    "install_crd",
    "model_volume",
    "running_operator",
    "scratch_namespace",
]

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "kubemoe.io_modeldeployments.yaml"
CRD_NAME = "modeldeployments.kubemoe.io"


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubemoe-e2e", "-f", str(CRD)
    )
    cluster.wait_established(f"crd/{CRD_NAME}")


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def get_or_none(cluster: Cluster, *args: str) -> Any:
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr or "not found" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def model_volume(
    ns: str,
    *,
    host_path: str = "/srv/models",
    size: str = "100Gi",
    claim: str = "models",
    access: str = "ReadOnlyMany",
) -> str:
    """A hostPath PersistentVolume bound to claim `claim` in `ns` (the pvc:// source a manifest
    names; model-cache, ReadWriteMany, for model.cache), as a kubectl List. On kwok nodes the path
    need not exist; on a real node it must."""
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{claim}-{ns}"},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": [access],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": host_path},
            "claimRef": {"namespace": ns, "name": claim},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": ns},
        "spec": {
            "accessModes": [access],
            "storageClassName": "",
            "volumeName": f"{claim}-{ns}",
            "resources": {"requests": {"storage": size}},
        },
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]})


class OperatorProcess:
    """`python -m kubemoe_operator` against `cluster`, logging to `log`."""

    def __init__(self, cluster: Cluster, *, log: Path, args: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = self.cluster.env()
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubemoe_operator", *self.args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, the lease is left to expire."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def writes(self) -> list[str]:
        """Every write the operator logged (`write: VERB KIND NS/NAME`)."""
        return [line.split("write: ", 1)[1] for line in self.text().splitlines() if "write: " in line]

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


def scraping_operator(
    cluster: Cluster,
    namespace: str,
    *,
    log: Path,
    lease_name: str,
    interval_s: float,
    extra: tuple[str, ...] = (),
) -> OperatorProcess:
    """An operator for one namespace that autoscales every `interval_s` on the metrics it scrapes from
    the role pods itself (no Prometheus), with a Lease of its own (not started)."""
    args = ("--namespace", namespace, "--lease-namespace", OPERATOR_NAMESPACE, "--lease-name", lease_name)
    return OperatorProcess(
        cluster, log=log, args=(*args, "--autoscale-interval-seconds", str(interval_s), *extra)
    )


@contextlib.contextmanager
def scratch_namespace(cluster: Cluster, *, prefix: str) -> Iterator[str]:
    """The ModelDeployment CRD installed and a fresh namespace, deleted after (its pods gone before
    this returns: see delete_namespace)."""
    install_crd(cluster)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        delete_namespace(cluster, name)


def delete_namespace(cluster: Cluster, name: str) -> None:
    """Delete namespace `name` and wait until no pod is left in it: its pods must hold no GPUs the
    next test needs. The namespace object itself may linger (its other contents go on being removed
    behind the next test); a loaded machine once took over 120 s to finish it, so pods only, and a
    deadline of 300 s."""
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
    eventually(
        lambda: not get_json(cluster, "pods", "-n", name)["items"],
        timeout=300,
        what=f"the pods of namespace {name} gone",
    )


def operator_args(
    namespace: str, *, resync_s: float = 3, lease_name: str | None = None, autoscale_s: float = 0
) -> tuple[str, ...]:
    """The flags the e2e operators share: one namespace, a short resync, a 4 s lease in the operator's
    namespace (a standby takes over fast), and the autoscaler off unless `autoscale_s` is set (kwok's
    pods serve no metrics; the autoscaler's own suite turns it on)."""
    args = ["--namespace", namespace, "--resync-seconds", f"{resync_s:g}"]
    args += ["--lease-namespace", OPERATOR_NAMESPACE, "--lease-seconds", "4"]
    if lease_name is not None:
        args += ["--lease-name", lease_name]
    return (*args, "--autoscale-interval-seconds", f"{autoscale_s:g}")


def leading(proc: OperatorProcess, *, times: int = 1) -> None:
    """Wait until `proc` has taken the Lease `times` times (its log is appended to across restarts):
    only the Lease holder reconciles."""
    eventually(
        lambda: proc.text().count("leading as") >= times, timeout=90, what="the operator to take the Lease"
    )


@contextlib.contextmanager
def running_operator(
    cluster: Cluster, *, log: Path, args: tuple[str, ...], request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """The operator started, then stopped; its log's tail is printed if a test failed meanwhile."""
    proc = OperatorProcess(cluster, log=log, args=args)
    proc.start()
    failed_before = request.session.testsfailed
    try:
        yield proc
    finally:
        proc.stop()
        if request.session.testsfailed > failed_before:
            print(f"\n--- operator log ({log}) ---\n{proc.tail(150)}")
