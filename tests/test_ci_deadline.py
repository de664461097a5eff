"""The CI deadline (conftest.py at the repository root): past it, tests fail at once with a reason."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(deadline: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBEMOE_CI_DEADLINE": str(deadline)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_ci_summary.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("offset", "passes"), [(3600.0, True), (-1.0, False)])
def test_tests_fail_at_once_past_the_deadline(offset: float, passes: bool) -> None:
    p = _run(time.time() + offset)
    out = p.stdout + p.stderr
    assert (p.returncode == 0) == passes, out
    assert ("deadline passed (KUBEMOE_CI_DEADLINE" in out) == (not passes), out
    if not passes:
        assert " passed" not in out.splitlines()[-1], out
