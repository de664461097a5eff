"""Where the vLLM CPU build lives for tests: $KUBEMOE_VLLM_PYTHON, else the repository's .venv-vllm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> str:
    """The interpreter with vLLM, or skip the test (run `make setup-vllm` to build it)."""
    python = os.environ.get("KUBEMOE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no vLLM interpreter at {python}; run `make setup-vllm`")
    return python


def run_in_vllm(code: str, *, stdin: str = "", timeout: float = 300) -> str:
    """Run `code` with the vLLM interpreter; return its stdout (a failure shows its stderr)."""
    done = subprocess.run(
        [vllm_python(), "-c", code],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"vLLM subprocess failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return done.stdout
