"""`kubemoe up | status | down` with real processes: stand-in engines (a shell that waits on a `sleep`,
so each process group holds two processes) started, found and stopped as a run's are.

- SIGHUP (the terminal closed), SIGTERM and Ctrl-C stop a foreground `kubemoe up` and every process it
  started; before the run was ready, `kubemoe up` exits 128 + the signal.
- an interrupt while `start_run` starts processes stops those it had started.
- a stopped run leaves no state.json; `status`/`down` without a name skip runs whose processes are gone.
- `down` never signals a pid from state.json that now names another process (reused, or after a reboot).
- the demo names its own run for `status` and `down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.cli.kubemoe import main
from kubemoe_operator.local import demo
from kubemoe_operator.local.layout import LOOPBACK, LocalProcess
from kubemoe_operator.local.processes import group_members
from kubemoe_operator.local.start import start_run
from kubemoe_operator.local.state import STATE_FILE, RunState
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.local.terminal import sigint_as_from_a_terminal

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny-moe.yaml"
TINY_PROCESSES = 4  # router, prefill, two decode ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _group_members(pgid: int) -> list[int]:
    return group_members(pgid)


def _start_time(pid: int) -> int | None:
    """/proc/PID/stat field 22, read here (not by the code under test)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _kill_groups(pgids: list[int]) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def stand_in_runtime(tmp_path: Path) -> Path:
    """A `kubemoe-runtime` that serves nothing: a shell waiting on a child (both in its process group)."""
    script = tmp_path / "bin" / "kubemoe-runtime"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def sleepers() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start `sleep` processes in sessions of their own (pid = process group); all killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
        started.append(proc)
        return proc

    yield start
    _kill_groups([p.pid for p in started])
    for proc in started:
        proc.wait(timeout=10)


def _state(
    run_dir: Path, name: str, pids: list[int], *, start_times: list[int | None], boot_id: str | None = None
) -> RunState:
    """A state.json as `kubemoe up` writes it (built from a dict: the fields as they are stored)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    processes = [
        {
            "process": LocalProcess(
                name=f"decode-g0-p{i}",
                role="decode",
                group=0,
                pod=i,
                leader=i == 0,
                ranks=[i],
                port=9001 + i,
                argv=["d"],
                env={},
            ).model_dump(),
            "pid": pid,
            "log": str(run_dir / f"d{i}.log"),
            "start_time": start,
        }
        for i, (pid, start) in enumerate(zip(pids, start_times, strict=True))
    ]
    state = RunState.model_validate(
        {
            "name": name,
            "model": "tiny-qwen3-moe",
            "layout": "D1x(EP2)",
            "mode": "colocated",
            "run_dir": str(run_dir),
            "endpoint": "http://127.0.0.1:1/v1",
            "started": time.time(),
            "supervisor_pid": os.getpid(),
            "processes": processes,
            "boot_id": boot_id or _boot_id(),
        }
    )
    state.save()
    return state


def _exited_pid() -> tuple[int, int | None]:
    proc = subprocess.Popen(["sleep", "0.1"], start_new_session=True)
    start = _start_time(proc.pid)
    proc.wait(timeout=10)
    return proc.pid, start


# --- status and down find the run that runs --------------------------------------------------------


def test_status_and_down_skip_a_stopped_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sleepers: Callable[[], subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run that is over (its state.json left by an older kubemoe, or by a crash) must not make `kubemoe
    status`/`down` ask for a name: before, the demo's `status -o json` failed with "several runs" and
    left its four processes running."""
    monkeypatch.chdir(tmp_path)
    dead, dead_start = _exited_pid()
    _state(Path(".run/up/old"), "old", [dead], start_times=[dead_start])
    live = [sleepers(), sleepers()]
    _state(
        Path(".run/up/tiny-moe"),
        "tiny-moe",
        [p.pid for p in live],
        start_times=[_start_time(p.pid) for p in live],
    )

    assert main(["status", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["name"] == "tiny-moe"
    assert [row["state"] for row in status["processes"]] == ["loading", "loading"]

    assert main(["down"]) == 0
    assert "stopped tiny-moe (2 processes)" in capsys.readouterr().err
    assert [_group_members(p.pid) for p in live] == [[], []]  # (down reaped them: they were its children)
    assert not Path(".run/up/tiny-moe", STATE_FILE).exists()  # a stopped run is gone from status

    # The stopped run left alone is the only one: status shows it as exited, down forgets it.
    assert main(["status", "-o", "json"]) == 0
    assert [row["state"] for row in json.loads(capsys.readouterr().out)["processes"]] == ["exited"]
    assert main(["down"]) == 0
    assert not Path(".run/up/old", STATE_FILE).exists()
    assert main(["status"]) == 1
    assert "no local run (start one with `kubemoe up FILE`)" in capsys.readouterr().err


def test_two_running_runs_need_a_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sleepers: Callable[[], subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        proc = sleepers()
        _state(Path(".run/up", name), name, [proc.pid], start_times=[_start_time(proc.pid)])
    assert main(["down"]) == 1
    assert "several local runs are running: name one (a, b)" in capsys.readouterr().err
    assert main(["down", "b"]) == 0
    assert main(["status", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "a"


# --- a stale state.json ----------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
@pytest.mark.parametrize("stale", ["pid-reused", "rebooted"])
def test_down_leaves_a_process_that_took_a_recorded_pid_alone(
    stale: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sleepers: Callable[[], subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """state.json names a pid that is now someone else's process (its start time differs: the pid was
    reused; or the machine has rebooted since): `kubemoe down` must not signal its process group."""
    monkeypatch.chdir(tmp_path)
    other = sleepers()  # an unrelated process leading its own group, under a pid the stale run recorded
    start = _start_time(other.pid)
    assert start is not None
    _state(
        Path(".run/up/tiny-moe"),
        "tiny-moe",
        [other.pid],
        start_times=[start - 100 if stale == "pid-reused" else start],
        boot_id="an-earlier-boot" if stale == "rebooted" else None,
    )
    assert main(["status", "-o", "json"]) == 0
    assert [row["state"] for row in json.loads(capsys.readouterr().out)["processes"]] == ["exited"]
    assert main(["down"]) == 0
    time.sleep(0.3)
    assert other.poll() is None, "kubemoe down signalled a process the run never started"
    assert not Path(".run/up/tiny-moe", STATE_FILE).exists()


# --- a foreground `kubemoe up` stopped by a signal -------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from kubemoe_operator.cli.kubemoe import main
    from kubemoe_operator.local import commands

    commands.runtime_command = lambda: sys.argv[1]
    sys.exit(main(["up", *sys.argv[2:]]))
    """
)


@pytest.mark.parametrize(
    "sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["SIGHUP", "SIGTERM", "SIGINT"]
)
def test_a_signal_stops_kubemoe_up_and_every_process(
    sig: signal.Signals, tmp_path: Path, stand_in_runtime: Path
) -> None:
    """The terminal closing sends `kubemoe up` SIGHUP: its processes are in sessions of their own, so
    they get nothing; `kubemoe up` must stop them (it did so for SIGTERM only) and forget the run. Stopped
    before it was ready, it exits 128 + the signal (it exited 0, so `URL=$(kubemoe up FILE -d) && curl
    $URL` went on with no URL)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")  # the stand-in engines read nothing
    run_dir = tmp_path / "run"
    up = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(stand_in_runtime),
            str(TINY),
            "--model",
            str(model),
            "--port",
            str(_free_port()),
            "--run-dir",
            str(run_dir),
            "--timeout",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_from_a_terminal,  # noqa: PLW1509 (only this runs before exec)
    )
    pgids: list[int] = []
    try:

        def started() -> bool:
            nonlocal pgids
            with contextlib.suppress(OSError, ValueError):
                pgids = [p["pid"] for p in json.loads((run_dir / STATE_FILE).read_text())["processes"]]
            return len(pgids) == TINY_PROCESSES and all(len(_group_members(g)) == 2 for g in pgids)

        _eventually(lambda: started() or up.poll() is not None, timeout=60, what="the processes to start")
        assert up.poll() is None, up.communicate()
        up.send_signal(sig)
        out, err = up.communicate(timeout=60)
        assert up.returncode == 128 + sig, err  # 129, 143, 130: never ready, so never a success
        assert out == ""  # no endpoint for a script to go on with
        assert "stopped tiny-moe" in err, err
        assert f"kubemoe up: {sig.name} before the run was ready" in err, err
        assert [_group_members(g) for g in pgids] == [[]] * TINY_PROCESSES
        assert not (run_dir / STATE_FILE).exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        _kill_groups(pgids)


# --- an interrupt while starting ------------------------------------------------------------------


def test_an_interrupt_while_starting_stops_what_had_started(
    tmp_path: Path, stand_in_runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM, SIGHUP) while start_run is starting the processes: `kubemoe up` has no state
    to stop yet, so start_run must stop those it had started before passing the interrupt on."""
    plan = plan_manifest(load_manifest(TINY))
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[Any]] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        if len(started) == 2:
            raise KeyboardInterrupt
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    run_dir = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            start_run(
                plan,
                model=tmp_path / "model",
                run_dir=run_dir,
                router_port=_free_port(),
                runtime=str(stand_in_runtime),
            )
        assert len(started) == 2
        assert [_group_members(p.pid) for p in started] == [[], []]
        assert not (run_dir / STATE_FILE).exists()
    finally:
        _kill_groups([p.pid for p in started])
        for proc in started:
            proc.wait(timeout=10)


# --- the demo --------------------------------------------------------------------------------------


def test_the_demo_names_its_own_run_for_status_and_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With another run's state.json beside it, `kubemoe status`/`down` without a name cannot tell which
    run the demo means: the demo names its own (metadata.name, as `kubemoe up` names the run)."""
    pytest.importorskip("openai")
    log = tmp_path / "calls"
    status = {"endpoint": f"http://{LOOPBACK}:{_free_port()}/v1", "model": "tiny-qwen3-moe", "processes": []}
    kubemoe = tmp_path / "kubemoe"
    kubemoe.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, sys
            with open({str(log)!r}, "a") as log:
                log.write(json.dumps(sys.argv[1:]) + "\\n")
            if sys.argv[1] == "status":
                print(json.dumps({status!r}))
            """
        )
    )
    kubemoe.chmod(0o755)
    monkeypatch.setattr(demo, "_kubemoe", lambda: str(kubemoe))
    monkeypatch.chdir(tmp_path)

    # The stand-in's endpoint answers nothing: the question fails (one line), and down still runs.
    assert demo.main([str(TINY), "--port", "8123"]) == 1
    assert "kubemoe demo: error: Connection error." in capsys.readouterr().err
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        ["up", str(TINY), "--detach", "--port", "8123"],
        ["status", "tiny-moe", "-o", "json"],
        ["down", "tiny-moe"],
    ]
