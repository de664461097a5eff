"""Watch a local run: whether a process is ready (its /ready, else its /health), the progress line while
the run loads (`wait_ready`, which fails as soon as a process exits), the first process of a run that
exited, and a log's tail.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kubemoe_operator.local.layout import LocalProcess, roles_in_order
from kubemoe_operator.local.processes import pid_alive, process_alive
from kubemoe_operator.local.state import LocalRunError, ProcessState, RunState

PROBE_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 30


def probe(url: str) -> int | None:
    """HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return None


def is_ready(process: LocalProcess) -> bool:
    status = probe(f"{process.url}/ready")
    if status == 404:  # a server without /ready (plain vLLM): /health answers once it serves
        status = probe(f"{process.url}/health")
    return status == 200


def log_tail(path: str, *, lines: int = LOG_TAIL_LINES) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def progress_line(state: RunState, ready: set[str], *, elapsed: float) -> str:
    parts = []
    for role in roles_in_order([p.process for p in state.processes]):
        members = [p for p in state.processes if p.process.role == role]
        done = sum(p.process.name in ready for p in members)
        ranks = sum(len(p.process.ranks) for p in members)
        what = f"{done}/{len(members)} ready" + (f" ({ranks} ranks)" if ranks else "")
        parts.append(f"{role} {what}")
    return f"[{elapsed:5.1f}s] loading {state.name}: " + " · ".join(parts)


def wait_ready(
    state: RunState,
    *,
    timeout: float,
    progress: Callable[[str], None],
    poll_s: float = 0.5,
) -> None:
    """Poll every process until all are ready; fail as soon as one exits (with its log's tail)."""
    start = time.monotonic()
    ready: set[str] = set()
    while True:
        elapsed = time.monotonic() - start
        for p in state.processes:
            if p.process.name in ready:
                continue
            if not pid_alive(p.pid):
                raise LocalRunError(f"{p.process.name} exited while loading; {p.log}:\n{log_tail(p.log)}")
            if is_ready(p.process):
                ready.add(p.process.name)
                p.ready_s = round(time.time() - state.started, 2)
                state.save()
        progress(progress_line(state, ready, elapsed=elapsed))
        if len(ready) == len(state.processes):
            return
        if elapsed > timeout:
            missing = [p.process.name for p in state.processes if p.process.name not in ready]
            raise LocalRunError(f"not ready after {timeout:.0f}s: {', '.join(missing)}")
        time.sleep(poll_s)


def first_exited(state: RunState) -> ProcessState | None:
    return next((p for p in state.processes if not process_alive(state, p)), None)
