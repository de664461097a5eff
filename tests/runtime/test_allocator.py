"""The engine process's malloc settings (model/allocator.py), each in a fresh interpreter (they are
process-wide): freed memory is reused without faulting its pages in again, on the main thread and on
others (the serving pod's first rank has a thread of its own), release_freed_memory gives it back, and
a user's own malloc settings are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Minor page faults of malloc'ing twenty 4 MiB blocks, writing them and freeing them (as a forward's
# temporaries), rounds 4 and 5, on the main thread or another, with keep_freed_memory() called first
# ("keep", as the engine's process does: before it starts threads) or not; then those of one more round
# after release_freed_memory(): "<applied> <faults> <after release>". Under glibc's defaults the first free
# raises its mmap threshold to a block's size and its trim threshold to twice that, so the freed 80 MiB
# are trimmed and fault in again each round. Transparent huge pages are off for the process: with them a
# 2 MiB page faults once, and a fault count says less.
SCRIPT = """
import ctypes, resource, sys, threading
from kubemoe_runtime.engines.torch.model.allocator import keep_freed_memory, release_freed_memory

libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = sys.argv[2] == "keep" and keep_freed_memory()
counted = []

def once():
    blocks = [libc.malloc(4 << 20) for _ in range(20)]
    for block in blocks:
        ctypes.memset(block, 1, 4 << 20)
    for block in reversed(blocks):
        libc.free(block)

def measured():
    for _ in range(3):
        once()
    start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    once()
    once()
    counted.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)

if sys.argv[1] == "thread":
    worker = threading.Thread(target=measured)
    worker.start()
    worker.join()
else:
    measured()
release_freed_memory()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
once()
print(applied, counted[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
PAGES = 20 * (4 << 20) // 4096  # a round's 4 KiB pages


def run(where: str, keep: bool, env: dict[str, str] | None = None) -> tuple[bool, int, int]:
    """SCRIPT in a fresh interpreter with no malloc settings of this environment's, plus `env`."""
    own = (
        "GLIBC_TUNABLES",
        "LD_PRELOAD",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_ARENA_MAX",
    )
    base = {k: v for k, v in os.environ.items() if k not in own}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, where, "keep" if keep else "glibc"],
        env={**base, "PYTHONPATH": str(RUNTIME), **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_memory_is_reused_without_page_faults(where: str) -> None:
    applied, after, released = run(where, keep=True)
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc): the engine leaves its malloc as it is")
    _, before, _ = run(where, keep=False)
    assert before >= PAGES // 2, "glibc's defaults fault freed blocks in anew (the reason for the settings)"
    assert after < 100
    assert released >= PAGES // 2, "release_freed_memory() gave the pages back"


@pytest.mark.parametrize(
    "env",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_ARENA_MAX": "4"},
    ],
    ids=lambda env: next(iter(env.values())),
)
def test_a_users_own_malloc_settings_are_left_alone(env: dict[str, str]) -> None:
    applied, after, _ = run("main", True, env)
    assert not applied
    assert after > 1000  # glibc's own behaviour: freed blocks fault in anew


def test_other_tunables_do_not_stop_it() -> None:
    applied, after, _ = run("main", True, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert applied
    assert after < 100
