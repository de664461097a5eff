"""glibc malloc settings for the engine's process: freed memory kept for the next forward, not returned.

glibc serves a block from 128 KiB up with mmap (its threshold rises to the size of a freed one, to at most
32 MiB) and gives it back to Linux on free, trims the heap's free top past twice that threshold, and
deletes a thread's heap (of at most 64 MiB) once all of it is free. A forward's large temporaries (gathered
rows, expert outputs, attention scores) are then faulted in anew, page by page, on every prefill: a
16 x 128-token prefill of the bench model on the torch MoE path took 70,000 page faults and ran 1.19x
faster without them. So, once per process:

    M_MMAP_THRESHOLD  32 MiB, glibc's largest: smaller blocks come from the heap
    M_TRIM_THRESHOLD  1 GiB: the heap's free top is kept, up to that
    M_ARENA_MAX       1: every thread allocates from the main heap, which is never deleted (the serving
                      pod's first rank runs on a thread of its own); set before the pod starts threads

The process then stays near its high-water mark, as under tcmalloc, or jemalloc with the MALLOC_CONF that
torch's and vLLM's CPU launchers set. `TorchEngine.load` calls `release_freed_memory()` when done, so the
weights' loading temporaries do not stay mapped.

Left as glibc has it: another C library (musl, macOS: no mallopt), and a process whose environment sets
these settings itself (GLIBC_TUNABLES' glibc.malloc.mmap_threshold, trim_threshold or arena_max, or
MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or MALLOC_ARENA_MAX): that is also how to opt out, e.g.
GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Final

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and their values here
SETTINGS: Final = {-3: 32 << 20, -1: 1 << 30, -8: 1}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_ARENA_MAX
USERS: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")
TUNABLES: Final = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.arena_max")


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library's
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc has both


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings once per process (module docstring); whether they were."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in USERS) or any(name in tunables for name in TUNABLES):
        return False
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.restype, libc.mallopt.argtypes = ctypes.c_int, (ctypes.c_int, ctypes.c_int)
    done = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
    if done:
        log.debug("glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB, one arena (freed memory kept)")
    return done


def release_freed_memory() -> None:
    """Give Linux back the heap's free pages now (malloc_trim), where keep_freed_memory() applied: after
    the weights are loaded."""
    if keep_freed_memory() and (libc := _libc()) is not None:
        libc.malloc_trim(0)
