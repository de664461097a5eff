"""A handle on a running cluster: its kubeconfig and the real kubectl/helm binaries."""

from __future__ import annotations

import json
import os
import subprocess
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

    def helm(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the real helm against this cluster."""
        return self._run("helm", args, stdin=stdin, check=check, timeout=timeout)
