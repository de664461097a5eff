"""The interpreters that hold an engine's own package for tests (vLLM's CPU build, SGLang): each lives in
a virtual environment of its own, found at $KUBEMOE_<ENGINE>_PYTHON, else the repository's .venv-<engine>."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EnginePython:
    name: str  # as messages name it: "vLLM"
    env: str  # the variable that points at its interpreter
    venv: str  # the repository's virtual environment for it
    setup: str  # the make target that builds that environment
    flags: tuple[str, ...] = ()  # the interpreter's own options for run()

    def python(self) -> str:
        """The interpreter, or skip the test (saying which make target builds it)."""
        python = os.environ.get(self.env) or str(REPO / self.venv / "bin" / "python")
        if not Path(python).exists():
            pytest.skip(f"no {self.name} interpreter at {python}; run `make {self.setup}`")
        return python

    def run(
        self, code: str, *, stdin: str = "", timeout: float = 300, env: dict[str, str] | None = None
    ) -> str:
        """Run `code` with the interpreter on one thread, `env` added to this environment; return its stdout
        (a failure shows its stderr)."""
        done = subprocess.run(
            [self.python(), *self.flags, "-c", code],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        assert done.returncode == 0, (
            f"{self.name} subprocess failed ({done.returncode}):\n{done.stderr[-6000:]}"
        )
        return done.stdout


VLLM = EnginePython("vLLM", "KUBEMOE_VLLM_PYTHON", ".venv-vllm", "setup-vllm")
SGLANG = EnginePython(
    "SGLang", "KUBEMOE_SGLANG_PYTHON", ".venv-sglang", "setup-sglang", flags=("-W", "ignore")
)
