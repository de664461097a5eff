"""Stop a local run: SIGTERM to each process group it started (router first), a wait, then SIGKILL to what
is left, and /proc checked until no process of any group remains. Only the run's own processes are
signalled (processes.py). A stopped run's state.json and its KV directory (RUN_DIR/kv, remove_kv) are
removed (its logs stay).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kubemoe_operator.local.processes import process_alive, run_members
from kubemoe_operator.local.state import LocalRunError, RunState, run_dir_lock

STOP_GRACE_S = 20.0
KV_DIR = "kv"  # RUN_DIR/kv: vLLM's example connector's shared directory (layout.py)


def remove_kv(run_dir: Path) -> None:
    """Remove RUN_DIR/kv and all it holds. vLLM's example connector names a prompt's KV folder by a
    hash of its token ids alone, and prefill and decode load it whenever it is there: what an earlier
    run saved (another checkpoint with the same tokenizer and shapes, under the same name) would answer
    this run's repeated prompts with the old model's KV, and the folder would grow from run to run.
    Only what is inside run_dir/kv goes: a symlink is removed, never followed (kv itself, or any inside
    it: shutil.rmtree does not follow them, and refuses a kv swapped for one meanwhile). OSError when
    it cannot be removed."""
    kv = run_dir / KV_DIR
    if kv.is_symlink() or (kv.exists() and not kv.is_dir()):
        kv.unlink()  # the link (or a stray file) itself, not what it points to
    elif kv.is_dir():
        shutil.rmtree(kv)


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
    returns pids still alive afterwards (none, normally). When none is, state.json and RUN_DIR/kv are
    removed."""
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
        forget_run(state)
    return left


def forget_run(state: RunState) -> None:
    """Remove a stopped run's KV and state.json, under RUN_DIR/lock and only while state.json is still
    this run's: once the processes are gone a `kubemoe up` may start in the run dir, emptying kv and
    writing state.json under that lock, and neither of a later run is removed here. Where a start holds
    the lock past UNREGISTER_WAIT_S both are left to it. A kv that cannot be removed now is removed (or
    the run refused, saying why) by the next start (start.py)."""
    run_dir = Path(state.run_dir)
    with contextlib.suppress(OSError), run_dir_lock(state.name, run_dir) as locked:
        if not locked or not _still_recorded(state, run_dir):
            return
        with contextlib.suppress(OSError):  # nothing of the run is left to read or write it
            remove_kv(run_dir)
        state.remove()


def _still_recorded(state: RunState, run_dir: Path) -> bool:
    """Whether run_dir's state.json is still `state`'s start (whatever it recorded since: a ready time),
    or is gone or unreadable; False once a later run has written its own."""
    try:
        recorded = RunState.load(run_dir)
    except LocalRunError:
        return True
    return (recorded.started, recorded.supervisor_pid, recorded.boot_id) == (
        state.started,
        state.supervisor_pid,
        state.boot_id,
    )
