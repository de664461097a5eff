"""`kubemoe-runtime fill-cache`: fill a model cache folder once from the Hugging Face Hub, with progress.

The command line: its flags, the run (a cache already complete for --source exits at once; otherwise
the fill holds DIR's lock, waiting while another fill of DIR runs, then looks again), SIGTERM, and the
outcome, one line on stdout or stderr and in the termination log (the package docstring has it
all).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from kubemoe_runtime.pod.messages import human_bytes
from kubemoe_runtime.tools.model_cache.errors import UsageError, explain, write_termination_log
from kubemoe_runtime.tools.model_cache.fill import Outcome, fill
from kubemoe_runtime.tools.model_cache.lock import fill_lock
from kubemoe_runtime.tools.model_cache.marker import complete, read_marker
from kubemoe_runtime.tools.model_cache.progress import PROG, Progress, ProgressServer, say
from kubemoe_runtime.tools.model_cache.source import Source, parse_source

DEBUG_ENV: Final = "KUBEMOE_DEBUG"
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class Interrupted(Exception):
    """SIGTERM (the Job deleted): stop; the next run resumes."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("stopped by SIGTERM: the next run resumes")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", required=True, help="hf://ORG/NAME[@REVISION]")
    parser.add_argument("--dir", required=True, type=Path, help="the cache folder (created if absent)")
    parser.add_argument("--port", type=int, default=8080, help="GET /progress here (0: any free port)")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds /progress stays up after the end")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: give 0..65535")
    if not 0 <= args.linger <= 3600:
        parser.error(f"--linger {args.linger}: give 0..3600 seconds")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    directory: Path = args.dir
    progress = Progress()
    source: Source | None = None
    server: ProgressServer | None = None
    try:
        source = parse_source(args.source)
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"--dir {directory}: not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        already = _already_complete(directory, source, started)
        if already is not None:  # without the lock: the marker is written last, whole (a rename)
            return _succeed(already)
        try:
            server = ProgressServer(args.port, progress)
        except OSError as err:
            raise UsageError(
                f"--port {args.port}: cannot listen ({err.strerror}): give another --port"
            ) from err
        server.start()
        say(f"progress: GET http://0.0.0.0:{server.server_address[1]}/progress")
        signal.signal(signal.SIGTERM, _on_sigterm)
        with fill_lock(directory, progress) as locked:
            already = _already_complete(directory, source, started)  # another fill may have just ended
            if already is not None:
                progress.set(phase="done", message="the cache is complete")
                return _succeed(already)
            outcome = fill(source, directory, progress, alone=locked)
        return _succeed(outcome)
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(err)
        if isinstance(err, KeyboardInterrupt):
            line = "interrupted: the next run resumes"
        elif isinstance(err, Interrupted):
            line = str(err)
        else:
            line = explain(err, source, directory)
        progress.set(phase="failed", message=line)
        say(f"error: {line}")
        write_termination_log(f"{PROG}: error: {line}")
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if server is not None:
            if args.linger:
                with contextlib.suppress(Interrupted, KeyboardInterrupt):
                    time.sleep(args.linger)
            server.shutdown()


def _already_complete(directory: Path, source: Source, started: float) -> Outcome | None:
    """DIR's marker names `source` and every file it lists is there: nothing to fetch."""
    marker = read_marker(directory)
    if marker is None or marker.source != str(source) or not complete(directory, marker):
        return None
    say(
        f"the cache is complete: {directory} holds {source} at {marker.revision} "
        f"({len(marker.files)} files, {human_bytes(marker.bytes)})"
    )
    seconds = time.monotonic() - started
    return Outcome(marker=marker, fetched_bytes=0, seconds=seconds, already=True)


def _succeed(outcome: Outcome) -> int:
    summary = outcome.summary()
    with contextlib.suppress(OSError):
        print(summary, flush=True)
    write_termination_log(summary)
    return 0
