"""Stop a local run: SIGTERM to each process group it started (router first), a wait, then SIGKILL to what
is left, and /proc checked until no process of any group remains. Only the run's own processes are
signalled (processes.py). A stopped run's state.json is removed (its logs stay).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from kubemoe_operator.local.processes import process_alive, run_members
from kubemoe_operator.local.state import RunState

STOP_GRACE_S = 20.0


@contextlib.contextmanager
def signals_ignored(*signals: signal.Signals) -> Iterator[None]:
    """Ignore these signals meanwhile (a second Ctrl-C, a SIGTERM or SIGHUP must not cut a stop short and
    leave strays); the handlers before are put back after. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_run(state: RunState, *, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stop every process group (router first) the run started, and nothing else (run_members);
    returns pids still alive afterwards (none, normally). When none is, state.json is removed."""
    order = sorted(state.processes, key=lambda p: p.process.role != "router")
    for p in order:
        if run_members(state, p):
            _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(
        run_members(state, p) or process_alive(state, p) for p in order
    ):
        time.sleep(0.2)
    for p in order:
        if run_members(state, p):
            _signal_group(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    left: list[int] = []
    while time.monotonic() < deadline:
        for p in order:
            process_alive(state, p)  # reaps our own children
        left = [pid for p in order for pid in run_members(state, p)]
        if not left:
            break
        time.sleep(0.1)
    if not left:
        state.remove()
    return left
