"""`make test`'s last line (.ci/summary.py) from real pytest JUnit XML and the stage times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUMMARY = Path(__file__).resolve().parents[1] / ".ci" / "summary.py"


def test_summary_counts_each_stage_and_says_which_failed(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert False\n"
        "@pytest.mark.skip(reason='why')\n"
        "def test_d(): pass\n"
    )
    reports = tmp_path / "reports"
    reports.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(suite),
            f"--junitxml={reports}/e2e.xml",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stdout
    (reports / "times").write_text("lint 4 0\ne2e 9 1\n")
    out = subprocess.run(
        [sys.executable, str(SUMMARY), str(reports)], capture_output=True, text=True, check=True
    ).stdout
    assert (
        out.strip()
        == "make test: lint 4s ok | e2e 2 passed, 1 failed, 1 skipped 9s FAILED (exit 1) | total 13s"
    )
