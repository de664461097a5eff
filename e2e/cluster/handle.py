"""A handle on a running cluster: its kubeconfig and the real kubectl/helm binaries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path
    audit_log: Path | None = None
    """The apiserver's audit log (requests by service accounts), when this harness started it."""

    def audit_events(self, *, user: str) -> list[dict[str, Any]]:
        """Audit events (stage ResponseComplete) of requests made by `user`, oldest first."""
        if self.audit_log is None or not self.audit_log.exists():
            raise AssertionError("this cluster has no audit log (it was not started by e2e.cluster)")
        events = []
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("stage") == "ResponseComplete" and event["user"]["username"] == user:
                events.append(event)
        return events

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _run(
        self, tool: str, args: tuple[str, ...], *, stdin: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / tool), *args],
            input=stdin,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster."""
        return self._run("kubectl", args, stdin=stdin, check=check, timeout=timeout)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD (crd/NAME or -f=FILE) is Established. `kubectl wait` alone fails at once
        ('.status.conditions accessor error') when it reads a CRD before the API server has written
        any condition, which a large CRD (CEL rules to compile) makes likely; so it runs again until
        the conditions are there."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            proc = self.kubectl(
                "wait", "--for=condition=Established", f"--timeout={left}s", *crds, check=False
            )
            if proc.returncode == 0:
                return
            if "accessor error" not in proc.stderr or time.monotonic() > deadline:
                raise AssertionError(f"CRDs {' '.join(crds)} not Established:\n{proc.stderr}{proc.stdout}")
            time.sleep(0.2)

    def helm(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the real helm against this cluster."""
        return self._run("helm", args, stdin=stdin, check=check, timeout=timeout)

    @contextlib.contextmanager
    def port_forward(self, target: str, port: int, *, namespace: str, timeout: float = 60) -> Iterator[int]:
        """`kubectl port-forward target :port` (the kubelet's real streaming on a real node);
        yields the local port on 127.0.0.1, stops the forward on exit."""
        proc = subprocess.Popen(
            [
                str(self.bin_dir / "kubectl"),
                "port-forward",
                "-n",
                namespace,
                "--address=127.0.0.1",
                target,
                f":{port}",
            ],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + timeout
            assert proc.stdout is not None
            line = ""
            while time.monotonic() < deadline:  # "Forwarding from 127.0.0.1:43211 -> 8080"
                line = proc.stdout.readline()
                if m := re.match(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line):
                    yield int(m.group(1))
                    return
                if not line and proc.poll() is not None:
                    break
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise AssertionError(f"kubectl port-forward {target} :{port} did not start: {line}{err}")
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
