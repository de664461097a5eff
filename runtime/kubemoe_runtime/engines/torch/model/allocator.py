"""glibc malloc settings for the engine's process: freed memory kept for the next forward, not returned.

glibc serves a block from 128 KiB up with mmap (its threshold rises to the size of a freed one, to at most
32 MiB) and gives it back to Linux on free, and trims the heap's free top past twice that threshold. A
forward's large temporaries (gathered rows, expert outputs, attention scores) are then faulted in anew, page
by page, on every prefill: a 16 x 128-token prefill of the bench model on the torch MoE path took 70,000
page faults and ran 1.19x faster without them. Fixing the mmap threshold at its maximum (32 MiB) and the
trim threshold at 1 GiB keeps those pages mapped between forwards: the process stays at its high-water
mark, as under tcmalloc or jemalloc (which vLLM's CPU docs have users preload). Blocks past 32 MiB are
still mmap'd.

Left as it is: a C library without mallopt (musl), and a process whose GLIBC_TUNABLES already sets malloc
tunables (the user's choice).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Final

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD: Final = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set the thresholds once per process (module docstring); whether they were set."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: its C library's
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, (ctypes.c_int, ctypes.c_int)
    done = bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if done:
        log.debug("glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB (freed memory kept)")
    return done
