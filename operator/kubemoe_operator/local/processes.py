"""A local run's processes as /proc shows them: each one's start time (in clock ticks after boot) and the
boot's id, which state.json records, so that a pid from a stale state.json that now names another process
(after a reboot, or reused) is never taken for the run's (`run_members`, `process_alive`, `run_alive`);
the live members of a process group, and whether a process itself (not a zombie) still runs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kubemoe_operator.local.state import ProcessState, RunState


def _stat_fields(text: str) -> list[str]:
    """/proc/PID/stat from its third field (state) on: `pid (comm) state ppid pgrp ...`; comm may hold
    spaces and parentheses, so split after the last ')'. Field N (1-based, proc(5)) is [N - 3]."""
    return text[text.rindex(")") + 2 :].split()


def _proc_entries() -> list[tuple[int, int, str]]:
    """(pid, process group, state letter) of every process, from /proc."""
    entries = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = _stat_fields(stat)
        entries.append((int(entry.name), int(fields[2]), fields[0]))
    return entries


def process_start_time(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (/proc/PID/stat field 22); None when it is
    gone or there is no /proc."""
    try:
        return int(_stat_fields(Path(f"/proc/{pid}/stat").read_text())[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str | None:
    """This boot's id (Linux), None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _same_boot(state: RunState) -> bool:
    return state.boot_id is None or state.boot_id == boot_id()


def _is_ours(state: RunState, p: ProcessState) -> bool:
    """Whether p.pid, if it is still taken, is the process the run started (not a later one given the
    pid after a reboot or after ours exited)."""
    if not _same_boot(state):
        return False
    if p.start_time is None:
        return True  # not recorded: nothing to tell them apart by
    now = process_start_time(p.pid)
    return now is None or now == p.start_time


def run_members(state: RunState, p: ProcessState) -> list[int]:
    """Live processes of p's process group that the run started: none when the pid now names another
    process; with p itself gone (its group outlives it while a child lives), the members that
    started after it."""
    if not _is_ours(state, p):
        return []
    members = group_members(p.pid)
    if p.start_time is None:
        return members
    started = [(pid, process_start_time(pid)) for pid in members]
    return [pid for pid, start in started if start is None or start >= p.start_time]


def process_alive(state: RunState, p: ProcessState) -> bool:
    """Whether the run's process itself still runs (not a zombie, not a later process with its pid)."""
    return pid_alive(p.pid) and _is_ours(state, p)


def run_alive(state: RunState) -> bool:
    """Whether anything the run started still runs."""
    return any(run_members(state, p) or process_alive(state, p) for p in state.processes)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    return [pid for pid, group, letter in _proc_entries() if group == pgid and letter not in ("Z", "X")]


def pid_alive(pid: int) -> bool:
    """Whether the process itself (not a zombie) still runs; reaps it if it is our child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.is_dir():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
