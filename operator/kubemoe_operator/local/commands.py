"""`kubemoe up | down | status`: the command-line side of a local run (start.py, watch.py and stop.py do
the work)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.local.devices import DeviceKey, DeviceShortageError, device_ranges, machine_devices
from kubemoe_operator.local.layout import LOCAL_ENGINES
from kubemoe_operator.local.model import (
    ModelSourceError,
    checkpoint_config,
    ensure_model,
    local_model_path,
    with_checkpoint_facts,
)
from kubemoe_operator.local.processes import run_alive
from kubemoe_operator.local.start import runtime_command, start_run
from kubemoe_operator.local.state import (
    STATE_FILE,
    LocalRunError,
    RunState,
    index_dir,
    indexed_run_dir,
    indexed_runs,
)
from kubemoe_operator.local.status import status_json, status_table
from kubemoe_operator.local.stop import signals_ignored, stop_run
from kubemoe_operator.local.watch import first_exited, log_tail, wait_ready
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.run.settings import port_type

RUNS_DIR = Path(".run") / "up"
EXIT_INVALID = 2
# What stops a foreground `kubemoe up` (besides Ctrl-C): `kill`, and the terminal closing (SIGHUP; the
# processes it started are in sessions of their own, so nothing else would stop them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Progress:
    """One line rewritten in place on a terminal; on a pipe or file, a line each time it changes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
        elif line.split("] ", 1)[-1] != self.last.split("] ", 1)[-1]:
            print(line, file=self.stream, flush=True)
        self.last = line

    def done(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) to `kubemoe up`, handled as Ctrl-C is; its exit status says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def stop_exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports a process it ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (stop.signum if isinstance(stop, Stopped) else signal.SIGINT)


port_number = port_type(off=False)
"""--port's type: the router's port (0, a random one, is refused: readiness could never probe it)."""


def _is_running(run_dir: Path) -> bool:
    try:
        return run_alive(RunState.load(run_dir))
    except (LocalRunError, OSError):
        return False


def _known_runs() -> list[tuple[str, Path]]:
    """(name, run dir) of every run with a state.json: the per-user index's, then the working directory's
    .run/up/ (runs a kubemoe without the index started); each run dir once."""
    seen: set[Path] = set()
    runs: list[tuple[str, Path]] = []
    local = [(p.parent.name, p.parent) for p in sorted(RUNS_DIR.glob(f"*/{STATE_FILE}"))]
    for name, run_dir in [*indexed_runs().items(), *local]:
        resolved = run_dir.resolve()
        if resolved not in seen and (run_dir / STATE_FILE).is_file():
            seen.add(resolved)
            runs.append((name, run_dir))
    return runs


def find_run_dir(name: str | None, run_dir: str | None) -> Path:
    """The run `kubemoe status`/`down` mean, from any directory (the per-user index): the one named, else
    the only one running (a run whose processes have all exited does not count), else the only one
    there is."""
    if run_dir is not None:
        return Path(run_dir)
    if name is not None:
        named = [d for d in (indexed_run_dir(name), RUNS_DIR / name) if d is not None]
        with_state = [d for d in named if (d / STATE_FILE).is_file()]
        alive = [d for d in with_state if _is_running(d)]
        if alive or with_state:
            return (alive or with_state)[0]
        raise LocalRunError(f"no local run named {name} (none in {index_dir()}/ or {RUNS_DIR}/ here)")
    runs = _known_runs()
    running = [(n, d) for n, d in runs if _is_running(d)]
    if len(running) == 1:
        return running[0][1]
    if running:
        raise LocalRunError(f"several local runs are running: name one ({', '.join(n for n, _ in running)})")
    if len(runs) == 1:
        return runs[0][1]
    if not runs:
        raise LocalRunError("no local run (start one with `kubemoe up FILE`)")
    raise LocalRunError(f"no local run is running; stopped ones: {', '.join(n for n, _ in runs)} (name one)")


def problem_lines(path: Path, err: ManifestError) -> list[str]:
    """Why a manifest cannot be planned: each problem's field and message, and its fix (`kubemoe plan`
    and `kubemoe up` print the same)."""
    count = len(err.problems)
    lines = [f"{path}: cannot plan ({count} problem{'s' if count != 1 else ''}):"]
    for problem in err.problems:
        lines.append(f"  {problem.field}: {problem.message}")
        if problem.fix:
            lines.append(f"    fix: {problem.fix}")
    return lines


def plan_local(md: ModelDeployment, model: Path) -> tuple[Plan, list[str]]:
    """The plan of a local run: the manifest with the model facts of the checkpoint's own config.json
    (under the manifest's inline values), planned as the operator plans; and notes for the user (inline
    values config.json contradicts). ManifestError when it cannot be planned."""
    facts = checkpoint_config(model)
    notes: list[str] = []
    if facts is not None:
        md, conflicts = with_checkpoint_facts(md, facts)
        if conflicts:
            notes.append(
                f"note: spec.model.config differs from {model / 'config.json'}: {', '.join(conflicts)};"
                " planning with the manifest's values"
            )
    return plan_manifest(md), notes


def cmd_up(args: argparse.Namespace) -> int:
    """`kubemoe up`. A stop signal (Ctrl-C, SIGTERM, SIGHUP) stops whatever was started and exits 128 +
    the signal (130, 143, 129): a script's `URL=$(kubemoe up FILE -d) && ...` must not go on. Only a
    foreground run that was ready and is then stopped by its user exits 0."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    try:
        return _up(args)
    except KeyboardInterrupt as stop:
        code = stop_exit_code(stop)
        print(f"\nkubemoe up: {signal.Signals(code - 128).name} before the run was ready", file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare(
    args: argparse.Namespace, path: Path
) -> tuple[Plan, Path, str, dict[DeviceKey, list[str]]] | int:
    """The manifest, checked for what `kubemoe up` can run, its model (generated if it is the tiny one),
    its plan and each pod's accelerators; or the exit status after saying why not."""
    if not path.is_file():
        print(f"kubemoe up: {path}: no such file", file=sys.stderr)
        return EXIT_INVALID
    try:
        md = load_manifest(path)
    except ManifestError as err:
        print("\n".join(problem_lines(path, err)), file=sys.stderr)
        return EXIT_INVALID
    if md.spec.engine.kind not in LOCAL_ENGINES:
        print(
            f"kubemoe up: spec.engine.kind is {md.spec.engine.kind}: kubemoe up runs the"
            f" {' and '.join(LOCAL_ENGINES)} engines only (their pods run kubemoe-runtime; a"
            f" {md.spec.engine.kind} pod runs its own image); set spec.engine.kind to vllm or torch, or"
            " deploy the manifest to a cluster (kubectl apply -f)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    try:
        runtime = runtime_command()
        model = local_model_path(args.model or md.spec.model.source, cwd=Path.cwd())
        config = md.spec.model.config
        ensure_model(
            model,
            model_name=md.spec.model.name,
            architecture=config.architecture if config else None,
            dtype=config.dtype if config else None,
            runtime=runtime,
            source_field="--model" if args.model else "spec.model.source",
            announce=lambda line: print(line, file=sys.stderr, flush=True),
        )
        plan, notes = plan_local(md, model)
        available, where = machine_devices(plan.resource, os.environ)
        devices = device_ranges(plan, available, source=where)
    except ManifestError as err:
        print("\n".join(problem_lines(path, err)), file=sys.stderr)
        return EXIT_INVALID
    except (ModelSourceError, LocalRunError, DeviceShortageError) as err:
        print(f"kubemoe up: {err}", file=sys.stderr)
        return EXIT_INVALID
    for note in notes:
        print(note, file=sys.stderr)
    return plan, model, runtime, devices


def _up(args: argparse.Namespace) -> int:
    path = Path(args.file)
    prepared = _prepare(args, path)
    if isinstance(prepared, int):
        return prepared
    plan, model, runtime, devices = prepared
    run_dir = Path(args.run_dir) if args.run_dir else RUNS_DIR / plan.name
    state: RunState | None = None
    keep = ready = False
    try:
        state = start_run(
            plan,
            model=model,
            run_dir=run_dir,
            router_port=args.port,
            runtime=runtime,
            devices=devices,
            say=lambda line: print(line, file=sys.stderr),
        )
        print(
            f"{plan.name}: {plan.layout}, {len(state.processes)} processes; logs in {run_dir}/logs",
            file=sys.stderr,
        )
        progress = Progress(sys.stderr)
        try:
            wait_ready(state, timeout=args.timeout, progress=progress)
        finally:
            progress.done()
        # Ready from here: once the endpoint is out, a stop signal is the user's Ctrl-C on a run that
        # served (exit 0), and a detached run stays up whatever comes after.
        ready, keep = True, args.detach
        announce_ready(state, out=sys.stdout, err=sys.stderr)
        if args.detach:
            print(
                "running in the background; `kubemoe status` shows it, `kubemoe down` stops it",
                file=sys.stderr,
            )
            return 0
        print("Ctrl-C stops everything", file=sys.stderr)
        while (gone := first_exited(state)) is None:
            time.sleep(0.5)
        print(f"kubemoe up: {gone.process.name} exited; {gone.log}:\n{log_tail(gone.log)}", file=sys.stderr)
        return 1
    except LocalRunError as err:
        print(f"kubemoe up: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if state is not None and not keep:
            print("\nstopping ...", file=sys.stderr)
        if not ready:
            raise  # before it was ready: 128 + the signal (cmd_up)
        return 0  # the user stopped a run that served: what Ctrl-C is for
    finally:
        if state is not None and not keep:
            with signals_ignored(signal.SIGINT, *STOP_SIGNALS):  # a second one must not leave strays
                left = stop_run(state)  # removes state.json once nothing is left
            print(f"stopped {state.name}" + (f"; still alive: {left}" if left else ""), file=sys.stderr)


def ready_summary(state: RunState) -> str:
    by_role: dict[str, float] = {}
    for p in state.processes:
        if p.ready_s is not None:
            by_role[p.process.role] = max(by_role.get(p.process.role, 0.0), p.ready_s)
    timings = ", ".join(f"{role} {seconds:.1f}s" for role, seconds in by_role.items())
    return f"ready ({timings}); OpenAI endpoint: {state.endpoint}"


def announce_ready(state: RunState, *, out: TextIO, err: TextIO) -> None:
    """The ready line with the endpoint on stderr, for the person; and the endpoint alone on stdout for
    a program reading it (`make demo`, scripts; the line that says `kubemoe up` is ready), unless stdout
    is the same terminal, where the person has just read it."""
    print(ready_summary(state), file=err, flush=True)
    if not out.isatty():
        print(state.endpoint, file=out, flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    try:
        state = RunState.load(find_run_dir(args.name, args.run_dir))
    except LocalRunError as err:
        print(f"kubemoe down: {err}", file=sys.stderr)
        return 1
    with signals_ignored(signal.SIGINT, *STOP_SIGNALS):  # stopped halfway would leave strays
        left = stop_run(state)  # removes state.json once nothing is left
    if left:
        print(f"kubemoe down: processes still alive: {left}", file=sys.stderr)
        return 1
    print(f"stopped {state.name} ({len(state.processes)} processes)", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state = RunState.load(find_run_dir(args.name, args.run_dir))
    except LocalRunError as err:
        print(f"kubemoe status: {err}", file=sys.stderr)
        return 1
    print(status_json(state) if args.output == "json" else status_table(state))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser(
        "up", help="run a ModelDeployment as local processes (router, prefill, decode, ranks)"
    )
    up.add_argument("file", help="ModelDeployment manifest (YAML)")
    up.add_argument(
        "--port", type=port_number, default=8000, help="the router's port on 127.0.0.1 (default 8000)"
    )
    up.add_argument(
        "--model", default=None, help="checkpoint directory or file:// URL; overrides model.source"
    )
    up.add_argument(
        "--run-dir",
        default=None,
        help=f"logs and state (default {RUNS_DIR}/NAME; `kubemoe status`/`down` find it from anywhere)",
    )
    up.add_argument("-d", "--detach", action="store_true", help="return once ready, leave it running")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every process")
    up.set_defaults(run=cmd_up)
    for command, run, text in (
        ("down", cmd_down, "stop a local run (every process, no strays)"),
        ("status", cmd_status, "roles, ranks, health and the endpoint of a local run"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("name", nargs="?", default=None, help="the deployment's name (default: the only run)")
        p.add_argument("--run-dir", default=None)
        if command == "status":
            p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.set_defaults(run=run)
