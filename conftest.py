"""For both suites (tests/ and e2e/): a CI run's deadline. `.ci/run` sets KUBEMOE_CI_DEADLINE (Unix
seconds) far enough inside CI's own limit that a test started just before it can still run out its
pytest-timeout. A test that would start after it fails at once, so a run that is going to be late
ends with pytest's summary of what failed and why, rather than being killed mid-test with nothing
said (as on 2026-12-02, when a run spent its time on real-node tests waiting for a deleted image)."""

from __future__ import annotations

import os
import time

import pytest

DEADLINE = float(os.environ.get("KUBEMOE_CI_DEADLINE") or 0)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if DEADLINE and time.time() > DEADLINE:
        pytest.fail(
            "not run: the CI run's deadline passed (KUBEMOE_CI_DEADLINE, set by .ci/run); "
            "the failures before this one say what made the run late",
            pytrace=False,
        )
