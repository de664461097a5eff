"""Background processes owned by the harness: started in their own session, stopped by pidfile."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def start_daemon(cmd: list[str], *, log: Path, pidfile: Path, env: dict[str, str] | None = None) -> int:
    """Start cmd in a new session (its own process group), output to log, pid to pidfile."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    pidfile.write_text(str(proc.pid))
    time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"{cmd[0]} exited at once ({proc.returncode}); see {log}")
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def stop_pidfile(pidfile: Path, *, grace: float = 10.0) -> None:
    """SIGTERM the process group named by pidfile, SIGKILL after grace seconds, remove the file."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().strip() or 0)
    if pid > 0 and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    """Poll `check` until true; on timeout raise, with the tail of the daemon's `log` if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{tail}")
