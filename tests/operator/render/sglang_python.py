"""Where SGLang's parsers live for tests: $KUBEMOE_SGLANG_PYTHON, else the repository's .venv-sglang."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def sglang_python() -> str:
    """The interpreter with sglang and sglang-router, or skip the test (`make setup-sglang` builds it)."""
    python = os.environ.get("KUBEMOE_SGLANG_PYTHON") or str(REPO / ".venv-sglang" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no SGLang interpreter at {python}; run `make setup-sglang`")
    return python


def run_in_sglang(code: str, *, stdin: str = "", timeout: float = 300) -> str:
    """Run `code` with the SGLang interpreter; return its stdout (a failure shows its stderr)."""
    done = subprocess.run(
        [sglang_python(), "-W", "ignore", "-c", code],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"SGLang subprocess failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return done.stdout
