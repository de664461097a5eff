"""The torch engine pod's process (`PodProcess`): its engine thread's state, its child rank processes and
its HTTP server (`PodServer`, uvicorn ending on a signal or a failure), and how they end.

A failed pod (`PodProcess.fail`: a rank exited, a collective failed) records why on the API's ServerState
before the scheduler's requests are aborted, so a request submitted after that abort is refused too (app.py),
and ends its child ranks quickly: a short join, SIGTERM, then SIGKILL (a frozen rank acts on nothing
else), each reaped, none left behind (`PodProcess.finish`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import uvicorn

from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.serve.app import ServerState
from kubemoe_runtime.engines.torch.serve.group import Heartbeat
from kubemoe_runtime.engines.torch.serve.rank_job import RankJob, run_rank_process
from kubemoe_runtime.engines.torch.serve.timeouts import CHILD_JOIN_S, FAILED_JOIN_S, TERMINATE_WAIT_S
from kubemoe_runtime.pod.drain import DrainingServer
from kubemoe_runtime.pod.settings import ServeSettings

log = logging.getLogger("kubemoe_runtime.serve")


class PodServer(DrainingServer):
    """uvicorn re-raises SIGTERM once it has shut down, which would end the pod before it stops its ranks.
    Here a signal only starts the drain (pod/drain.py; with a timeout of 0, as a headless pod has, it
    asks the server to exit at once), then the server exits; `serve` then ends the group in order. A
    failed group (`PodProcess.fail`) sets should_exit, which ends a drain at once too."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class PodProcess:
    """This process: the engine thread, the child ranks and the HTTP server, and how they end."""

    def __init__(self, settings: ServeSettings, job: RankJob) -> None:
        self.settings = settings
        self.job = job
        self.stop = threading.Event()
        self.failure: str | None = None
        self.ready = False
        # the load of this process's rank (the first of the pod's): /ready shows it until ready
        self.progress = LoadProgress(label=f"rank {settings.data_parallel_start_rank}")
        self.ended_by_leader = False  # a headless pod: rank 0 sent Shutdown
        self.server: uvicorn.Server | None = None
        self.children: list[BaseProcess] = []
        self.heartbeat: Heartbeat | None = None  # this process's rank's, once it follows (headless)
        self.state: ServerState | None = None  # the API's (rank 0's pod): told of a failure first

    def problem(self) -> str | None:
        """Why this pod cannot serve: a rank failed, or (headless) its engine thread is stuck."""
        if self.failure is not None:
            return self.failure
        if self.heartbeat is None:
            return None
        return self.heartbeat.stalled(self.job.timeouts.stall_s)

    def fail(self, message: str) -> None:
        """Record the pod's failure (first the API's, before anything aborts its requests), and stop."""
        if self.state is not None and self.state.failure is None:
            self.state.failure = message
        if self.failure is None:
            self.failure = message
            log.error("kubemoe-runtime: %s", message)
        if self.server is not None:
            self.server.should_exit = True

    def start_children(self) -> None:
        ctx = mp.get_context("spawn")
        first = self.settings.data_parallel_start_rank
        for rank in range(first + 1, first + self.settings.data_parallel_size_local):
            child = ctx.Process(
                target=run_rank_process, args=(self.job, rank), name=f"rank-{rank}", daemon=True
            )
            child.start()
            self.children.append(child)
        if self.children:
            threading.Thread(target=self._watch_children, name="watch-ranks", daemon=True).start()

    def _watch_children(self) -> None:
        for sentinel in wait([c.sentinel for c in self.children]):
            child = next(c for c in self.children if c.sentinel == sentinel)
            child.join(timeout=1)  # its sentinel fires as it exits: reap it, for its exit code
            if not self.stop.is_set() and child.exitcode != 0:
                self.fail(f"{child.name} exited with code {child.exitcode}")

    def finish(self, *, child_wait_s: float = CHILD_JOIN_S) -> int:
        """End the child ranks and reap them; the pod's exit code. Each has `child_wait_s` (FAILED_JOIN_S
        once the pod failed) to exit, then TERMINATE_WAIT_S after SIGTERM, then is killed."""
        self.stop.set()
        if self.failure is not None:
            child_wait_s = min(child_wait_s, FAILED_JOIN_S)
        _join_all(self.children, child_wait_s)
        left = [c for c in self.children if c.is_alive()]
        for child in left:
            child.terminate()
        _join_all(left, TERMINATE_WAIT_S)
        for child in left:
            if child.is_alive():  # stopped (SIGSTOP), or deaf to SIGTERM
                log.warning("kubemoe-runtime: %s did not exit on SIGTERM; killing it", child.name)
                child.kill()
        _join_all(left, TERMINATE_WAIT_S)  # reaps them: SIGKILL ends even a stopped process
        return 1 if self.failure is not None else 0


def _join_all(children: list[BaseProcess], timeout: float) -> None:
    """Join each of `children`, all within `timeout` seconds from now."""
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
