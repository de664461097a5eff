"""Start, watch and stop a local run; its record is RUN_DIR/state.json (state.py), for `kubemoe status`
and `down`.

Every process starts in a session of its own, so its process group holds it and whatever it spawns (the
torch engine's rank processes, vLLM's engine cores); stopping sends SIGTERM to each group, waits, then
SIGKILLs what is left, and checks /proc until no process of any group remains. state.json records each
process's start time and the boot's id: a pid from a stale state.json that now names another process
(after a reboot, or reused) is never signalled. A stopped run's state.json is removed (its logs stay).

    RUN_DIR/logs/NAME.log       one per process (stdout and stderr)
    RUN_DIR/logs.prev/          the previous run's logs, moved aside as a run starts
    RUN_DIR/kv/                 the example connector's shared KV directory (vLLM)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from kubemoe_operator.local.devices import DeviceKey
from kubemoe_operator.local.layout import LOOPBACK, LocalProcess, local_processes, roles_in_order
from kubemoe_operator.local.state import (
    STATE_FILE,
    LocalRunError,
    ProcessState,
    RunState,
    indexed_run_dir,
    register,
    start_lock,
)
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.render.kv_key import KV_KEY_ENV

STOP_GRACE_S = 20.0
PROBE_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 30
LOGS = "logs"
PREVIOUS_LOGS = "logs.prev"


def runtime_command() -> str:
    """The `kubemoe-runtime` next to this interpreter (same virtualenv), else the one on PATH."""
    sibling = Path(sys.executable).parent / "kubemoe-runtime"
    if sibling.is_file():
        return str(sibling)
    found = shutil.which("kubemoe-runtime")
    if found is None:
        raise LocalRunError("kubemoe-runtime is not installed (pip install -e runtime)")
    return found


def default_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # many small processes on a few cores
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV per vLLM CPU engine
    env["PYTHONUNBUFFERED"] = "1"
    # The KV hand-off key (a Secret in a cluster): the router signs the kv_transfer_params it sends,
    # the prefill and decode verify them. One per run, shared by its processes only.
    env.setdefault(KV_KEY_ENV, secrets.token_hex(32))
    return env


def port_is_free(port: int) -> bool:
    """Whether a server could listen on LOOPBACK:port now. The probe binds with SO_REUSEADDR, as the
    router's server (uvicorn) does: connections of an earlier run that linger in TIME_WAIT (a minute on
    Linux) do not stop that server, so they must not stop the probe; a socket listening there does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
            s.listen(1)  # Linux lets a SO_REUSEADDR bind share a port bound (not listening) elsewhere
        except OSError:
            return False
    return True


def _refuse_if_running(name: str, run_dir: Path) -> None:
    """LocalRunError when a run of `name` (wherever it was started) or a run in run_dir still runs; an
    unreadable state.json there is refused too (its processes may run: state.py names them)."""
    elsewhere = indexed_run_dir(name)
    for where in dict.fromkeys(p for p in (run_dir, elsewhere) if p is not None):
        if not (where / STATE_FILE).is_file():
            continue
        previous = RunState.load(where)
        if run_alive(previous):
            place = "" if where == run_dir else f" (run dir {where})"
            raise LocalRunError(
                f"{previous.name} is already running{place}: `kubemoe status {previous.name}` shows it,"
                f" `kubemoe down {previous.name}` stops it"
            )


def keep_previous_logs(run_dir: Path) -> Path | None:
    """Move the last run's logs (a crash's evidence) to RUN_DIR/logs.prev, replacing older ones; returns
    where they went, None when there were none."""
    logs, previous = run_dir / LOGS, run_dir / PREVIOUS_LOGS
    if not logs.is_dir() or not any(logs.iterdir()):
        return None
    shutil.rmtree(previous, ignore_errors=True)
    logs.rename(previous)
    return previous


def start_run(
    plan: Plan,
    *,
    model: Path,
    run_dir: Path,
    router_port: int,
    runtime: str,
    devices: Mapping[DeviceKey, list[str]] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> RunState:
    """Start every process of the plan (engines first, the router last) and record them. The start lock
    (state.py) is held from before the checks until state.json holds every process: a second `kubemoe up`
    of the name meanwhile is refused, not started beside this one."""
    run_dir = run_dir.resolve()  # state.json and the logs it names are found from any directory
    with start_lock(plan.name, run_dir):
        _refuse_if_running(plan.name, run_dir)
        if not port_is_free(router_port):
            raise LocalRunError(f"port {router_port} is taken; pick another with --port")
        if (previous := keep_previous_logs(run_dir)) is not None:
            say(f"the previous run's logs are in {previous}")
        (run_dir / LOGS).mkdir(parents=True, exist_ok=True)
        (run_dir / "kv").mkdir(exist_ok=True)
        processes = local_processes(
            plan,
            model=model,
            runtime=runtime,
            router_port=router_port,
            kv_dir=run_dir / "kv",
            base_env=default_env(),
            devices=devices,
        )
        state = RunState(
            name=plan.name,
            model=plan.model,
            layout=plan.layout,
            mode=plan.mode,
            run_dir=str(run_dir),
            endpoint=f"http://{LOOPBACK}:{router_port}/v1",
            started=time.time(),
            supervisor_pid=os.getpid(),
            processes=[],
            boot_id=boot_id(),
        )
        try:
            state.save()
            register(plan.name, run_dir)  # `kubemoe status`/`down` find it from any directory
            for process in processes:
                log_path = run_dir / LOGS / f"{process.name}.log"
                with log_path.open("wb") as log:
                    popen = subprocess.Popen(
                        process.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=process.env,
                        start_new_session=True,
                    )
                started = process_start_time(popen.pid)
                state.processes.append(
                    ProcessState(process=process, pid=popen.pid, log=str(log_path), start_time=started)
                )
                state.save()  # each as it starts: whatever stops this, `kubemoe down` finds what runs
        except BaseException:
            # Ctrl-C, SIGTERM or a failed start halfway: stop what did start before passing it on (the
            # caller has no state to stop; state.json goes too, unless something would not stop).
            state.save()
            with signals_ignored(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                stop_run(state)
            raise
        state.save()
        return state


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


# --- processes ------------------------------------------------------------------------------------


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
