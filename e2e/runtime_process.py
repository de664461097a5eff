"""Real runtime processes on 127.0.0.1 (`kubemoe-runtime serve --engine torch`), and a bounded
closed-loop load generator against them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubemoe_runtime.pod.ports import free_port

RUNTIME = Path(sys.executable).parent / "kubemoe-runtime"


def tiny_checkpoint(out: Path) -> Path:
    """`kubemoe-runtime tiny-checkpoint OUT`: random weights, HF layout, a trained tokenizer."""
    if not (out / "config.json").exists():
        subprocess.run([str(RUNTIME), "tiny-checkpoint", str(out)], check=True, capture_output=True)
    return out


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


class RuntimeProcess:
    """One `serve` process of one role, its metrics labelled by `labels` (KUBEMOE_* variables).
    Niced, one thread: the control plane shares this machine."""

    def __init__(
        self,
        *,
        model: Path,
        role: str,
        labels: Mapping[str, str],
        log_dir: Path,
        args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.role = role
        command = [
            "nice",
            "-n",
            "10",
            str(RUNTIME),
            "serve",
            "--engine",
            "torch",
            "--role",
            role,
            "--model",
            str(model),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            *args,
        ]
        env = {**os.environ, **labels, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_dir / f"runtime-{role}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def target(self) -> str:
        """HOST:PORT, as a Prometheus static target."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return http_get(f"{self.url}/metrics")[1]

    def wait_ready(self, *, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.role} exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/ready", timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.role} not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL whatever is left of its session (the rank processes, if any)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


class LoadGenerator:
    """`clients` closed-loop clients posting completions to one runtime on 127.0.0.1, until
    `stop()`, `max_requests` requests or `max_seconds` — whichever comes first."""

    def __init__(
        self,
        base_url: str,
        *,
        clients: int,
        max_tokens: int = 64,
        max_requests: int = 5000,
        max_seconds: float = 120.0,
    ) -> None:
        if urllib.parse.urlsplit(base_url).hostname != "127.0.0.1":
            raise ValueError(f"the load generator only loads 127.0.0.1, not {base_url}")
        self.url = f"{base_url}/v1/completions"
        self.clients = clients
        self.body = json.dumps(
            {"model": "tiny", "prompt": "the load", "max_tokens": max_tokens, "ignore_eos": True}
        ).encode()
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.sent = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _take(self, deadline: float) -> bool:
        with self._lock:
            if self._stop.is_set() or self.sent >= self.max_requests or time.monotonic() > deadline:
                return False
            self.sent += 1
            return True

    def _client(self, deadline: float) -> None:
        while self._take(deadline):
            request = urllib.request.Request(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError) as err:
                with self._lock:
                    self.failures.append(f"{type(err).__name__}: {err}")
                return

    def start(self) -> LoadGenerator:
        deadline = time.monotonic() + self.max_seconds
        self._threads = [
            threading.Thread(target=self._client, args=(deadline,), name=f"load-{i}", daemon=True)
            for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Send no more; wait for the requests in flight to finish (the queue is empty after)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
