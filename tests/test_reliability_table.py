"""The README's reliability table (e2e/reliability_table.py), from a real pytest run's JUnit report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from e2e.reliability_table import RELIABILITY_END, RELIABILITY_START

SUITE = """
import pytest
from e2e.reliability import Outcome, record

def test_held(record_property):
    record(record_property, Outcome(fault="a | pipe", client_saw="200s", lost="0 of 4", recover_s=1.25))

def test_broke(record_property):
    record(record_property, Outcome(fault="a hang", client_saw="504s", lost="2 of 4", recover_s=None))
    assert False

def test_not_a_fault_test():
    pass
"""


PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")


def run_suite(tmp_path: Path) -> Path:
    (tmp_path / "test_faults_here.py").write_text(SUITE)
    report = tmp_path / "report.xml"
    root = Path(__file__).resolve().parents[1]
    settings = ("-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path))  # its junit_family
    subprocess.run(
        [*PYTEST, *settings, f"--junitxml={report}", str(tmp_path)],
        cwd=root,
        capture_output=True,
        check=False,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    return report


def table_of(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "e2e.reliability_table", *args], cwd=root, capture_output=True, text=True
    )


def test_outcomes_become_rows_saying_what_held(tmp_path: Path) -> None:
    report = run_suite(tmp_path)
    done = table_of(str(report))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| Fault | What the client saw | Requests lost | Recovered in | Held |")
    assert lines[2] == "| a \\| pipe | 200s | 0 of 4 | 1.2 s | yes | `test_faults_here::test_held` |"
    assert lines[3] == "| a hang | 504s | 2 of 4 | n/a | no | `test_faults_here::test_broke` |"
    assert len(lines) == 4, "a test that recorded nothing is not a row"


def test_the_readme_section_is_replaced_between_its_markers_only(tmp_path: Path) -> None:
    report = run_suite(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{RELIABILITY_START}\nold table\n{RELIABILITY_END}\nafter\n")
    done = table_of(str(report), "--readme", str(readme))
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith(f"# Title\n\nbefore\n{RELIABILITY_START}\n| Fault |")
    assert text.endswith(f"`test_faults_here::test_broke` |\n{RELIABILITY_END}\nafter\n")
    again = table_of(str(report), "--readme", str(readme))
    assert again.returncode == 0
    assert readme.read_text() == text, "running it twice changes nothing"


def test_a_readme_without_markers_or_a_missing_report_is_an_error(tmp_path: Path) -> None:
    report = run_suite(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    done = table_of(str(report), "--readme", str(readme))
    assert done.returncode == 2
    assert "no reliability markers" in done.stderr
    assert readme.read_text() == "# no markers\n", "left as it was"
    missing = table_of(str(tmp_path / "nope.xml"))
    assert missing.returncode == 2
    assert "nope.xml" in missing.stderr


def test_a_later_report_replaces_an_earlier_ones_row_for_the_same_test(tmp_path: Path) -> None:
    first = run_suite(tmp_path)
    rerun = tmp_path / "rerun.xml"
    rerun.write_text(first.read_text().replace("0 of 4", "1 of 4"))
    done = table_of(str(first), str(rerun))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]
    assert len(rows) == 2, rows
    assert "| 1 of 4 |" in rows[0], "the rerun's values, in the first report's place"
