"""A local run's record, its lock, and the per-user index of runs that `kubemoe status`/`down` read.

    RUN_DIR/state.json          what runs: argv, pid (= process group), start time, port, ready time, logs
    RUN_DIR/lock                held (flock) by the `kubemoe up` starting the run, until state.json is saved
    INDEX/NAME -> RUN_DIR       a symlink per run, INDEX = $XDG_STATE_HOME/kubemoe/up (default
                                ~/.local/state/kubemoe/up): `status`/`down` find a run from any directory,
                                and a second `kubemoe up` of the same name is refused wherever it starts
    INDEX/.NAME.lock            held with RUN_DIR/lock: two `kubemoe up` of one name in two directories;
                                and while an entry is removed (a later run's entry is never removed)

An entry whose RUN_DIR/state.json is another name's (a stale entry: that run dir was reused, by --run-dir,
after the run stopped without `kubemoe down`, e.g. by a reboot) is ignored, and removed when its name's
lock is free.

The run dir itself stays where `kubemoe up` put it (.run/up/NAME under its working directory, or
--run-dir). A stopped run's state.json and index entry are removed (its logs stay).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kubemoe_operator.local.layout import LocalProcess

STATE_FILE = "state.json"
LOCK_FILE = "lock"
INDEX_SUBDIR = Path("kubemoe") / "up"
UNREGISTER_WAIT_S = 2.0  # how long removing an entry waits for its name's lock (a `kubemoe up` starting)


class LocalRunError(RuntimeError):
    pass


class ProcessState(BaseModel):
    process: LocalProcess
    pid: int
    log: str
    ready_s: float | None = None  # seconds from start to ready
    # /proc/PID/stat's starttime (clock ticks after boot): tells this process from a later one given the
    # same pid. None where there is no /proc (and in a state.json from before it was recorded).
    start_time: int | None = None


class RunState(BaseModel):
    name: str
    model: str
    layout: str
    mode: str
    run_dir: str
    endpoint: str
    started: float  # epoch seconds
    supervisor_pid: int
    processes: list[ProcessState]
    boot_id: str | None = None  # the kernel's boot id when it started: no process outlives a reboot

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)

    def remove(self) -> None:
        """Forget the run (its state.json and its index entry; the logs stay): `kubemoe status`/`down`
        no longer find it."""
        (Path(self.run_dir) / STATE_FILE).unlink(missing_ok=True)
        unregister(self.name, Path(self.run_dir))

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """The run recorded in run_dir; LocalRunError (the file, why, what to do) when there is none or
        it cannot be read (a state.json of another kubemoe version, a file cut short)."""
        path = run_dir.resolve() / STATE_FILE
        if not path.is_file():
            raise LocalRunError(f"no local run in {run_dir} (no {STATE_FILE})")
        try:
            text = path.read_text(errors="replace")
        except OSError as err:
            raise LocalRunError(f"{path}: cannot read it ({err.strerror})") from None
        try:
            state = cls.model_validate_json(text)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"])
            reason = f"{where}: {first['msg']}" if where else first["msg"]
            raise LocalRunError(unreadable_state(path, text, reason)) from None
        # Where it was found, whatever it recorded (a relative path, from another working directory).
        return state.model_copy(update={"run_dir": str(run_dir.resolve())})


def unreadable_state(path: Path, text: str, reason: str) -> str:
    """What to do about a state.json this kubemoe cannot read: remove it, after stopping the processes it
    names if they still run (their pids, where the file still lists them)."""
    pids = recorded_pids(text)
    still = (
        f"; the processes it recorded may still run: pids {', '.join(map(str, pids))}"
        f" (see `ps -o pid,pgid,args -p {','.join(map(str, pids))}`; stop each group with"
        " `kill -TERM -- -PID`)"
        if pids
        else "; the processes it recorded may still run (their pids cannot be read from it)"
    )
    return (
        f"{path} is not a state.json this kubemoe can read ({reason}; written by another version, or cut"
        f" short){still}; then remove it (rm {path})"
    )


def recorded_pids(text: str) -> list[int]:
    """The pids a state.json of any version lists (processes[].pid), as far as it is JSON."""
    try:
        raw: Any = json.loads(text)
    except ValueError:
        return []
    processes = raw.get("processes") if isinstance(raw, dict) else None
    if not isinstance(processes, list):
        return []
    return [
        p["pid"] for p in processes if isinstance(p, dict) and isinstance(p.get("pid"), int) and p["pid"] > 0
    ]


# --- the per-user index -----------------------------------------------------------------------------


def index_dir() -> Path:
    """$XDG_STATE_HOME/kubemoe/up, or ~/.local/state/kubemoe/up (XDG ignores a relative XDG_STATE_HOME)."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / INDEX_SUBDIR


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise LocalRunError(f"{name!r} is not a run's name (a ModelDeployment's metadata.name)")
    return name


def _entry(name: str) -> Path | None:
    """Where `name`'s index entry points, if there is one."""
    try:
        return Path(os.readlink(index_dir() / _check_name(name)))
    except OSError:
        return None


def _recorded_by_another(run_dir: Path, name: str) -> bool:
    """Whether run_dir/state.json is another name's run (not one an entry of `name` may point at). False
    when there is none, or it cannot be read (then the callers' own checks report it)."""
    try:
        recorded: Any = json.loads((run_dir / STATE_FILE).read_text(errors="replace"))
    except (OSError, ValueError):
        return False
    other = recorded.get("name") if isinstance(recorded, dict) else None
    return isinstance(other, str) and other != name


def indexed_run_dir(name: str) -> Path | None:
    """The run dir the index records for `name`, if any; a stale entry (its state.json is another name's)
    is none, and is removed if no `kubemoe up` of the name holds its lock."""
    recorded = _entry(name)
    if recorded is not None and _recorded_by_another(recorded, name):
        _drop_entry(name, recorded, wait_s=0.0, stale_only=True)
        return None
    return recorded


def _entries() -> dict[str, Path]:
    """Every entry of the index: name -> where it points."""
    runs: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(index_dir().iterdir()):
            if entry.is_symlink() and not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    runs[entry.name] = Path(os.readlink(entry))
    return runs


def indexed_runs() -> dict[str, Path]:
    """Every run the index records: name -> run dir (whether or not it still runs); stale entries left
    out."""
    return {name: run_dir for name, run_dir in _entries().items() if not _recorded_by_another(run_dir, name)}


def register(name: str, run_dir: Path) -> None:
    """Record run_dir (absolute) as the run named `name` (replacing a stopped one's entry); other names'
    entries for run_dir (runs it held before) are dropped. Called with the start lock held."""
    index = index_dir()
    entry = index / _check_name(name)
    run_dir = run_dir.resolve()
    tmp = index / f".{name}.new.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir, tmp)
    tmp.replace(entry)
    for other, recorded in _entries().items():
        if other != name and recorded == run_dir:
            _drop_entry(other, run_dir, wait_s=0.0)


def unregister(name: str, run_dir: Path) -> None:
    """Drop `name`'s index entry if it is this run's (a later run of the name elsewhere keeps its own)."""
    _drop_entry(name, run_dir.resolve(), wait_s=UNREGISTER_WAIT_S)


def _drop_entry(name: str, run_dir: Path, *, wait_s: float, stale_only: bool = False) -> None:
    """Remove `name`'s entry if it points at run_dir (and, stale_only, is still stale), read and removed
    under the name's lock: a `kubemoe up` of the name registers its run under that lock, so its entry is
    never the one removed. When the lock stays taken for wait_s, the entry stays (that `kubemoe up`
    replaces it, or it is ignored: its run dir holds no state.json of the name)."""
    with contextlib.suppress(OSError, LocalRunError), _name_lock(name, wait_s=wait_s) as locked:
        if not locked or _entry(name) != run_dir:
            return
        if not stale_only or _recorded_by_another(run_dir, name):
            (index_dir() / name).unlink()


# --- the start lock ---------------------------------------------------------------------------------


# Names whose lock this process holds (start_lock): a failed start's stop removes its entry without
# waiting for a lock it holds itself (flock: a second open file of the same file would wait).
_held: set[str] = set()


@contextlib.contextmanager
def _name_lock(name: str, *, wait_s: float) -> Iterator[bool]:
    """The name's index lock (INDEX/.NAME.lock), waiting up to wait_s for it; yields whether it is held."""
    if name in _held:
        yield True
        return
    with _file_lock(index_dir() / f".{_check_name(name)}.lock", wait_s=wait_s) as locked:
        yield locked


@contextlib.contextmanager
def run_dir_lock(name: str, run_dir: Path, *, wait_s: float = UNREGISTER_WAIT_S) -> Iterator[bool]:
    """RUN_DIR/lock (no `kubemoe up` starts in run_dir meanwhile), waiting up to wait_s for it; yields
    whether it is held (True at once where this process holds it: a failed start stopping its run)."""
    if name in _held:
        yield True
        return
    with _file_lock(run_dir / LOCK_FILE, wait_s=wait_s) as locked:
        yield locked


@contextlib.contextmanager
def _file_lock(path: Path, *, wait_s: float) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline, locked = time.monotonic() + wait_s, False
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        yield locked
    finally:
        os.close(fd)


def _try_lock(path: Path, stack: contextlib.ExitStack, *, name: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LocalRunError(
            f"{name} is already starting: another `kubemoe up` holds {path}; `kubemoe status {name}`"
            " shows it once it has started (`kubemoe down` stops it), or give this run another"
            " metadata.name"
        ) from None


@contextlib.contextmanager
def start_lock(name: str, run_dir: Path) -> Iterator[None]:
    """Held while a `kubemoe up` checks that `name` is not running and starts it: the name's lock in the
    index (one run of a name per user, whatever the directory) and RUN_DIR/lock (one run per run dir).
    A second `kubemoe up` meanwhile is refused at once (LocalRunError: "already starting"); the kernel
    releases both when the process ends, however it ends."""
    index = index_dir()
    try:
        index.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LocalRunError(
            f"{err.filename}: cannot create it ({err.strerror}); the index of local runs lives in"
            " $XDG_STATE_HOME/kubemoe/up (default ~/.local/state/kubemoe/up): set XDG_STATE_HOME to a"
            " writable directory, or pick another --run-dir"
        ) from None
    with contextlib.ExitStack() as stack:
        _try_lock(index / f".{_check_name(name)}.lock", stack, name=name)
        _try_lock(run_dir / LOCK_FILE, stack, name=name)
        _held.add(name)
        stack.callback(_held.discard, name)
        yield
