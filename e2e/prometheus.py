"""A real Prometheus server for the autoscaling tests: Debian's `prometheus` package, unpacked
(never installed, no system service) into ~/.cache/kubemoe/prometheus/, started with a generated
config of static targets and stopped for sure.

    python -m e2e.prometheus     fetch and unpack the binary (what `make prometheus` runs)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubemoe_runtime.pod.ports import free_port

PACKAGE = "prometheus"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kubemoe" / "prometheus"


def _download(into: Path) -> Path:
    """`apt-get download prometheus` into `into`; once more after `apt-get update` if apt has no
    package lists yet."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=into, capture_output=True, text=True, check=False
        )
        debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    raise RuntimeError(f"apt-get download {PACKAGE} failed:\n{proc.stdout}\n{proc.stderr}")


def ensure_binary(root: Path | None = None) -> Path:
    """The prometheus binary, unpacked from Debian's package on first use and cached."""
    root = root or cache_dir()
    binary = root / "usr" / "bin" / "prometheus"
    if binary.is_file():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("Prometheus comes from Debian's package: this needs apt-get and dpkg")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt's sandbox user may write here
        deb = _download(work)
        unpacked = work / "root"
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
        for child in unpacked.iterdir():  # usr/, etc/, ...: moved in whole, binary last-checked
            target = root / child.name
            if target.exists():
                shutil.rmtree(target)
            child.rename(target)
    if not binary.is_file():
        raise RuntimeError(f"{deb.name} has no usr/bin/prometheus")
    return binary


def config(
    targets: Sequence[str], *, scrape_interval: str, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One job scraping `targets` (HOST:PORT, path /metrics) with the labels the runtime set, and
    `labels` on every series (as Kubernetes service discovery adds `namespace` from the pod's)."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "kubemoe-runtime",
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "honor_labels": True,
                "static_configs": [{"targets": list(targets), "labels": dict(labels or {})}],
            }
        ],
    }


@dataclass
class PrometheusServer:
    """One Prometheus process on 127.0.0.1; `stop()` ends it (SIGTERM, then SIGKILL)."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    command: list[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API (what the operator's PrometheusSource calls)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it returned nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> int:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            active = json.loads(resp.read())["data"]["activeTargets"]
        return sum(1 for t in active if t.get("health") == "up")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def restart(self) -> None:
        """Start it again on the same address and data after `stop()` (a no-op while it runs)."""
        if self.alive():
            return
        self.process = _spawn(self.command, self.log_path)
        self.wait_ready()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start(
    targets: Sequence[str],
    *,
    workdir: Path,
    scrape_interval: str = "1s",
    binary: Path | None = None,
    labels: Mapping[str, str] | None = None,
) -> PrometheusServer:
    """Prometheus scraping `targets` (`labels` on their series), its config, data and log under
    `workdir`; ready when returned."""
    binary = binary or ensure_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "prometheus.yml"
    doc = config(targets, scrape_interval=scrape_interval, labels=labels)
    cfg.write_text(json.dumps(doc, indent=1))  # YAML ⊃ JSON
    port = free_port()
    log_path = workdir / "prometheus.log"
    command = [
        str(binary),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    server = PrometheusServer(
        process=_spawn(command, log_path), url=f"http://127.0.0.1:{port}", log_path=log_path, command=command
    )
    try:
        server.wait_ready()
    except AssertionError:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running(
    targets: Sequence[str], *, workdir: Path, scrape_interval: str = "1s"
) -> Iterator[PrometheusServer]:
    server = start(targets, workdir=workdir, scrape_interval=scrape_interval)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    print(ensure_binary())
