"""Every local-run test keeps `kubemoe up`'s per-user index of runs ($XDG_STATE_HOME/kubemoe/up) in its own
temporary directory, never the user's: a test's run is not found by (or refused because of) another's,
and the processes a test starts (they inherit the environment) use the same one."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("state-home")
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home
