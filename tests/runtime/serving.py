"""Run `kubemoe-runtime serve` as real subprocesses on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubemoe_runtime.pod.ports import free_port

LABEL_ENV = {"KUBEMOE_DEPLOYMENT": "tiny", "KUBEMOE_GROUP": "3"}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def http_post(url: str, body: Any, *, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


class Server:
    """One `serve` process (plus the rank processes it spawns), killed for sure on `stop`."""

    def __init__(
        self,
        model: Path,
        *,
        args: Sequence[str] = (),
        log_dir: Path,
        name: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = free_port() if port is None else port  # a replacement takes its predecessor's port
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kubemoe_runtime.cli", "serve", "--model", str(model)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", *args]
        full_env = {**os.environ, **LABEL_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        # A session of its own, so stop() can reach the rank processes this one spawns.
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, *, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(f"{self.url}/ready")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_listening(self, *, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                http_get(f"{self.url}/health")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server not listening after {timeout}s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM (the pod's normal end), then SIGKILL whatever of its session is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
            os.killpg(self.process.pid, signal.SIGKILL)  # rank processes, if any outlived it
        self._log.close()
        return self.process.returncode
