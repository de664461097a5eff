"""Run `kubemoe-runtime serve --role router` as a real subprocess for the router tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubemoe_runtime.pod.ports import free_port
from tests.runtime.serving import http_get


class RouterProcess:
    def __init__(
        self,
        *,
        args: Sequence[str],
        log_dir: Path,
        name: str = "router",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kubemoe_runtime.cli", "serve", "--role", "router"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"router exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/ready")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"router not ready after {timeout}s:\n{self.log()}")

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from /metrics (None if absent)."""
        _, text = http_get(f"{self.url}/metrics")
        return sample(text, name, **labels)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{.*\}})? (\S+)", line)
        if match is None:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return None
