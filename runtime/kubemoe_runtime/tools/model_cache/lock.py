"""One fill of DIR at a time: an exclusive lock (flock) on DIR/.kubemoe-fill.lock, held for the whole fill.

Two fills of one folder happen: two ModelDeployments sharing a claim and a source, or a new Job's pod
while the old one terminates. Unlocked, each one's cleanup of partial downloads deletes the other's file in
flight. Locked, the second waits (a line on stderr when it starts waiting, then every WAIT_LINE_EVERY_S),
then finds the folder complete. The lock goes with the process (crashed, killed: the kernel releases it),
so a stale lock cannot block a fill; the file stays (removing it would let two fills lock two files).
The holder writes its host name (a pod's name) and pid into the file, for the waiter's line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from kubemoe_runtime.tools.model_cache.progress import Progress, say

LOCK: Final = ".kubemoe-fill.lock"
POLL_S: Final = 0.2
WAIT_LINE_EVERY_S: Final = 30.0
# A volume whose file system cannot lock (an NFS mount without a lock manager, some FUSE ones).
_CANNOT_LOCK: Final = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


@contextlib.contextmanager
def fill_lock(directory: Path, progress: Progress) -> Iterator[bool]:
    """Hold DIR's lock for the block, waiting while another fill holds it; yields True when held, False
    when DIR's file system cannot lock (said on stderr: the fill goes on, as it did before the lock)."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    try:
        held = _acquire(fd, directory, progress)
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield held
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, directory: Path, progress: Progress) -> bool:
    started = time.monotonic()
    next_line: float | None = None  # when to say it still waits; None: not waiting yet
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno not in _CANNOT_LOCK:
                raise
            say(
                f"cannot lock {directory / LOCK} ({err.strerror}): filling without it: another fill of "
                f"this folder at the same time would break this one"
            )
            return False
        else:
            if next_line is not None:
                say(f"the other fill of {directory} ended after {time.monotonic() - started:.0f} s")
                progress.set(message="")
            return True
        now = time.monotonic()
        if next_line is None:
            line = f"waiting for another fill of {directory} to finish ({_holder(fd)} holds {LOCK})"
            progress.set(message=line)
            say(line)
            next_line = now + WAIT_LINE_EVERY_S
        elif now >= next_line:
            say(f"still waiting for the other fill of {directory} ({_holder(fd)}, {now - started:.0f} s)")
            next_line = now + WAIT_LINE_EVERY_S
        time.sleep(POLL_S)


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it (best effort: it may not have written it yet)."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text and text.isprintable() else "another process"
