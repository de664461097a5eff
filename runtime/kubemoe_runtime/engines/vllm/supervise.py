"""Run vLLM as this pod's child and the front (front.py) on the pod's port; live and die with vLLM.

    main thread      uvicorn: the front on --host/--port
    watcher thread   waits for vLLM to exit, then stops the front
    vLLM             a child process (same process group), on 127.0.0.1:<free port>

On SIGTERM or SIGINT the pod that serves the API drains first (pod/drain.py, as the torch engine's does):
the front answers new requests and /ready 503, so the router ejects it and sends them elsewhere, and the
requests in flight finish (up to --drain-timeout). Then vLLM gets SIGTERM (it stops its engines); the
front keeps answering /health until vLLM has exited. A `--headless` pod has no requests of its own and
forwards the signal at once. If vLLM outlives GRACE_S after that, or a second signal comes, it is killed.
Whenever vLLM exits the pod exits: with 0 after a requested stop, else with vLLM's code (1 if vLLM
claimed success), so that Kubernetes restarts the pod. There is no restart in here. A `--headless` pod's
0 unasked is a failure too: vLLM's headless mode returns 0 once any of its engines has ended, crashed
included (CoreEngineProcManager.monitor_engine_liveness), and it does not end when its group's leader
stops (its engines wait on; the group's teardown stops it with SIGTERM, a requested stop: 0).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import subprocess
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import FrameType
from typing import Final

import uvicorn

from kubemoe_runtime.engines.vllm.command import vllm_command, vllm_python
from kubemoe_runtime.engines.vllm.front import VllmUpstream, front_app
from kubemoe_runtime.pod.drain import Drain, DrainMiddleware
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.kv_auth import KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.pod.settings import ServeSettings

log = logging.getLogger("kubemoe_runtime.vllm")

GRACE_S: Final = 25.0  # under Kubernetes' default terminationGracePeriodSeconds (30)


class Supervisor:
    """The vLLM child: forward stop signals to it, kill it if it lingers, turn its end into an exit code."""

    def __init__(self, process: subprocess.Popen[bytes], *, grace_s: float = GRACE_S) -> None:
        self.process = process
        self.grace_s = grace_s
        self.stopping = False
        self._lock = threading.Lock()

    def request_stop(self, signum: int) -> None:
        with self._lock:
            if self.process.poll() is not None:
                return
            if self.stopping:  # a second signal: no more waiting
                log.warning("kubemoe-runtime: second signal %d; killing vLLM", signum)
                self.process.kill()
                return
            self.stopping = True
            log.warning("kubemoe-runtime: signal %d; stopping vLLM (pid %d)", signum, self.process.pid)
            self.process.send_signal(signal.SIGTERM)
        timer = threading.Timer(self.grace_s, self._kill_if_alive)
        timer.daemon = True
        timer.start()

    def _kill_if_alive(self) -> None:
        if self.process.poll() is None:
            log.warning("kubemoe-runtime: vLLM still running %.0fs after SIGTERM; killing it", self.grace_s)
            self.process.kill()

    def watch(self, server: uvicorn.Server) -> None:
        code = self.process.wait()
        if not self.stopping:
            log.error("kubemoe-runtime: vLLM exited with code %d; the pod exits too", code)
        server.should_exit = True

    def stop_now(self) -> None:
        """The front has ended: vLLM must not outlive it."""
        if self.process.poll() is None:
            self.request_stop(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def exit_code(self) -> int:
        code = self.process.returncode
        if code is None:
            return 1
        if self.stopping:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGKILL) else _shell_code(code)
        return _shell_code(code) if code != 0 else 1


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


class _FrontServer(uvicorn.Server):
    """uvicorn, but a stop signal drains the front, then goes to vLLM; the watcher stops the front once
    vLLM has exited. With a drain timeout of 0 (headless) the signal goes to vLLM at once."""

    def __init__(
        self, config: uvicorn.Config, *, supervisor: Supervisor, drain: Drain, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.supervisor = supervisor
        self.drain = drain
        self.drain_timeout = drain_timeout

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.drain_timeout > 0 and not self.drain.draining:
            self.drain.begin(self.drain_timeout)  # only sets attributes: safe in a signal handler
            return
        self.supervisor.request_stop(signum)  # headless, or a second signal: no more waiting

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.supervisor.stopping and self.drain.done():
            if self.drain.in_flight:
                log.warning(
                    "kubemoe-runtime: drain timeout: %d request(s) still in flight", self.drain.in_flight
                )
            self.supervisor.request_stop(signal.SIGTERM)
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_vllm(
    settings: ServeSettings,
    *,
    given: Collection[str] = (),
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> int:
    """Run one pod on vLLM until vLLM exits; return the pod's exit code."""
    port = free_port()
    argv = vllm_command(settings, python=vllm_python(env), port=port, given=given, extra=extra)
    shown = [a if "\n" not in a else "<headless launcher>" for a in argv]
    log.warning("kubemoe-runtime: starting vLLM on 127.0.0.1:%d: %s", port, shlex.join(shown))
    # The same process group as this one: whoever ends the pod's group ends vLLM and its engines too.
    process = subprocess.Popen(argv)
    supervisor = Supervisor(process)
    upstream = VllmUpstream(
        process=process,
        url=f"http://127.0.0.1:{port}",
        headless=settings.headless,
        labels=MetricLabels.from_env(role=settings.role, rank=settings.data_parallel_start_rank),
    )
    drain = Drain(pending=upstream.kv_waiting)  # a prefill's KV waits for its decode's pull
    front = front_app(upstream, signer=KVSigner.from_env())
    served = front if settings.headless else DrainMiddleware(front, drain)
    config = server_config(served, host=settings.host, port=settings.port, lifespan="on")
    timeout = 0 if settings.headless else settings.drain_timeout
    server = _FrontServer(config, supervisor=supervisor, drain=drain, drain_timeout=timeout)
    threading.Thread(target=supervisor.watch, args=(server,), name="watch-vllm", daemon=True).start()
    try:
        server.run()
    finally:
        supervisor.stop_now()
    return supervisor.exit_code()
