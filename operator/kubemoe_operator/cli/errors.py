"""What every command-line entry point (`kubemoe`, `kubectl-moe`) shares: errors as one line, never a
traceback; a quiet exit when the reader of stdout goes away (`kubemoe plan FILE | head`); `--version`.

    KUBEMOE_DEBUG=1   print the traceback of an unexpected error too (for a bug report)

A closed pipe is caught (BrokenPipeError), not left to SIGPIPE's default action (`signal(SIGPIPE,
SIG_DFL)`): that action kills the process on the spot, and `kubemoe up` must first stop the processes
it started (its `finally`), or they would run on with nobody to stop them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from kubemoe_operator.run.settings import package_version

DEBUG_ENV = "KUBEMOE_DEBUG"
EXIT_ERROR = 1
EXIT_PIPE = 128 + 13  # as a process ended by SIGPIPE (`yes | head` leaves `yes` with 141)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: the installed package's version (importlib.metadata), then exit 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's lines joined; its type's name when it has no message."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    return text or type(err).__name__


def _stdout_gone() -> int:
    """The reader of stdout has gone: point stdout at /dev/null, so that the flush at exit cannot fail
    again ("Exception ignored ... BrokenPipeError"), and exit as a process ended by SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, closed): nothing to flush
        pass
    return EXIT_PIPE


def run_main(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """`main(argv)` with the shared top-level handling: any exception becomes one `PROG: error: ...` line
    on stderr and exit 1 (KUBEMOE_DEBUG=1 adds the traceback); Ctrl-C exits 130 without a traceback;
    a closed stdout exits quietly. argparse's own usage errors (exit 2) and --help pass through."""
    try:
        code = main(argv)
        sys.stdout.flush()  # a pipe closed early fails here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        with contextlib.suppress(OSError):  # stderr is gone too: nothing left to tell
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
