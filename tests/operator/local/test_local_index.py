"""The per-user index of local runs (state.py) as its entries go stale or race, without starting a run:

- an entry whose run dir now holds another name's run (the dir reused by --run-dir after a reboot left
  the first run's entry) is not that name's run: `kubemoe down NAME` does not stop the other run, and
  `kubemoe up NAME` elsewhere is not refused because of it; registering the new run drops it.
- `unregister` (a stopped run's `down`) never removes the entry a concurrent `kubemoe up` of the name
  registers for its own run: it reads and removes under the name's lock.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_operator.local.commands import _known_runs, find_run_dir
from kubemoe_operator.local.layout import LocalProcess
from kubemoe_operator.local.processes import boot_id, process_start_time
from kubemoe_operator.local.start import _refuse_if_running
from kubemoe_operator.local.state import (
    UNREGISTER_WAIT_S,
    LocalRunError,
    ProcessState,
    RunState,
    index_dir,
    indexed_run_dir,
    indexed_runs,
    register,
    start_lock,
    unregister,
)


def _run(name: str, run_dir: Path, pid: int, *, boot: str | None) -> RunState:
    process = LocalProcess(
        name="worker-g0-p0", role="worker", group=0, pod=0, leader=True, ranks=[0], port=1, argv=["x"], env={}
    )
    state = RunState(
        name=name,
        model="m",
        layout="l",
        mode="colocated",
        run_dir=str(run_dir),
        endpoint="e",
        started=time.time(),
        supervisor_pid=os.getpid(),
        processes=[ProcessState(process=process, pid=pid, log="l", start_time=process_start_time(pid))],
        boot_id=boot,
    )
    state.save()
    return state


@pytest.fixture
def sleeper() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield child.pid
    child.kill()
    child.wait()


def test_a_run_dir_reused_by_another_name_is_not_the_first_names_run(tmp_path: Path, sleeper: int) -> None:
    shared = (tmp_path / "shared").resolve()
    shared.mkdir()
    index_dir().mkdir(parents=True)
    # alpha, left by a reboot (not alive; its state.json and entry stay), then beta in the same run dir
    _run("alpha", shared, 1, boot="an-earlier-boot")
    register("alpha", shared)
    _run("beta", shared, sleeper, boot=boot_id())
    register("beta", shared)

    assert indexed_runs() == {"beta": shared}
    assert not (index_dir() / "alpha").is_symlink()  # register dropped it
    with pytest.raises(LocalRunError, match="no local run named alpha"):
        find_run_dir("alpha", None)  # `kubemoe down alpha` does not stop beta
    assert find_run_dir("beta", None) == shared
    _refuse_if_running("alpha", tmp_path / "elsewhere")  # `kubemoe up alpha` elsewhere may start


def test_a_stale_entry_left_in_the_index_is_ignored_and_removed(tmp_path: Path, sleeper: int) -> None:
    shared = (tmp_path / "shared").resolve()
    shared.mkdir()
    index_dir().mkdir(parents=True)
    _run("beta", shared, sleeper, boot=boot_id())
    register("beta", shared)
    os.symlink(shared, index_dir() / "alpha")  # an entry no register dropped (an older kubemoe's)

    assert indexed_runs() == {"beta": shared}
    assert _known_runs() == [("beta", shared)]
    _refuse_if_running("alpha", tmp_path / "elsewhere")
    assert indexed_run_dir("alpha") is None
    assert not (index_dir() / "alpha").is_symlink()
    assert indexed_run_dir("beta") == shared


def test_unregister_never_removes_the_entry_a_concurrent_up_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubemoe down n` (run X) reads n's entry; meanwhile a `kubemoe up n` in Y (it found X not running)
    takes the start lock and registers Y; then down removes the entry. Either that up waits for (is
    refused by) the lock down holds, or its entry stays: never registered and then removed."""
    x, y = (tmp_path / "X").resolve(), (tmp_path / "Y").resolve()
    index_dir().mkdir(parents=True)
    register("n", x)
    real_readlink = os.readlink
    up_registered: list[bool] = []

    def readlink_then_up_starts(path: str | os.PathLike[str]) -> str:
        recorded = real_readlink(path)
        if Path(path) == index_dir() / "n" and not up_registered:
            try:
                with start_lock("n", y):
                    register("n", y)
                up_registered.append(True)
            except LocalRunError:
                up_registered.append(False)  # "n is already starting": down holds the name's lock
        return recorded

    monkeypatch.setattr(os, "readlink", readlink_then_up_starts)
    unregister("n", x)
    monkeypatch.undo()

    assert up_registered, "unregister did not read the entry"
    assert indexed_run_dir("n") == (y if up_registered[0] else None)


def test_a_failed_start_unregisters_under_its_own_start_lock_at_once(tmp_path: Path) -> None:
    """A start that fails stops what it started and removes its entry while it holds the name's lock: the
    removal must not wait for a lock its own process holds."""
    run_dir = (tmp_path / "run").resolve()
    began = time.monotonic()
    with start_lock("n", run_dir):
        register("n", run_dir)
        unregister("n", run_dir)
        assert indexed_run_dir("n") is None
    assert time.monotonic() - began < UNREGISTER_WAIT_S
