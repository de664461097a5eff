"""Start a local run: every process of the plan (engines first, the router last), recorded in
RUN_DIR/state.json (state.py) for `kubemoe status` and `down`.

Every process starts in a session of its own, so its process group holds it and whatever it spawns (the
torch engine's rank processes, vLLM's engine cores), which stop.py stops as one. state.json records each
process's start time and the boot's id (processes.py): a pid from a stale state.json that now names
another process (after a reboot, or reused) is never signalled. A run that fails to start halfway is
stopped before the failure is passed on.

    RUN_DIR/logs/NAME.log       one per process (stdout and stderr)
    RUN_DIR/logs.prev/          the previous run's logs, moved aside as a run starts
    RUN_DIR/kv/                 the example connector's shared KV directory (vLLM), empty as a run starts
                                and removed when it stops (stop.remove_kv: another run's KV is never read)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kubemoe_operator.local.devices import DeviceKey
from kubemoe_operator.local.layout import LOOPBACK, local_processes
from kubemoe_operator.local.processes import boot_id, process_start_time, run_alive
from kubemoe_operator.local.state import (
    STATE_FILE,
    LocalRunError,
    ProcessState,
    RunState,
    indexed_run_dir,
    register,
    start_lock,
)
from kubemoe_operator.local.stop import KV_DIR, remove_kv, signals_ignored, stop_run
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.render.kv_key import KV_KEY_ENV

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


def fresh_kv(run_dir: Path) -> Path:
    """An empty RUN_DIR/kv for this run (stop.remove_kv says why); LocalRunError when what an earlier
    run left there cannot be removed."""
    kv = run_dir / KV_DIR
    try:
        remove_kv(run_dir)
        kv.mkdir()
    except OSError as err:
        raise LocalRunError(
            f"cannot empty {kv}, the KV an earlier run saved ({err.strerror or err}): the engines would"
            f" load it for the same prompts; remove it (rm -r {kv})"
        ) from None
    return kv


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
        kv_dir = fresh_kv(run_dir)
        processes = local_processes(
            plan,
            model=model,
            runtime=runtime,
            router_port=router_port,
            kv_dir=kv_dir,
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
