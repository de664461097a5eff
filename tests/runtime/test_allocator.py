"""The engine process's malloc settings (model/allocator.py), each in a fresh interpreter (they are
process-wide): freed memory is reused without faulting its pages in again, and a user's GLIBC_TUNABLES
for malloc is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Minor page faults of writing four 16 MiB tensors, the second time (after the first four were freed),
# before and after keep_freed_memory(): "<set> <before> <after>".
SCRIPT = """
import resource, torch
from kubemoe_runtime.engines.torch.model.allocator import keep_freed_memory

def faults():
    def once():
        tensors = [torch.empty(8 << 20, dtype=torch.int16).fill_(1) for _ in range(4)]
        del tensors
    once()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    once()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
done = keep_freed_memory()
print(done, before, faults())
"""
RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def run(env: dict[str, str]) -> tuple[bool, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, "PYTHONPATH": str(RUNTIME), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_freed_memory_is_reused_without_page_faults() -> None:
    done, before, after = run({})
    if not done:
        pytest.skip("this C library has no mallopt (not glibc): the engine leaves its malloc as it is")
    assert before >= 4 * 4096 // 2, "glibc's defaults fault freed blocks in anew (the reason for the setting)"
    assert after < 100


def test_a_users_malloc_tunables_are_left_alone() -> None:
    done, _, after = run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not done
    assert after >= 4 * 4096 // 2  # trim at 0: every freed page goes back, and comes back as a fault
