"""One line saying what `make test` ran: each stage's time, and the unit and e2e counts.

Usage: summary.py REPORTS_DIR. Reads REPORTS_DIR/times ("STAGE SECONDS RC" per line, as the
Makefile's test target writes them) and REPORTS_DIR/STAGE.xml (pytest's JUnit XML) where present.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(xml: Path) -> str:
    """'377 passed, 15 skipped' from pytest's JUnit XML (every <testsuite> summed)."""
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    words = {"failures": "failed", "errors": "errors", "skipped": "skipped"}
    return ", ".join([f"{passed} passed", *(f"{total[k]} {w}" for k, w in words.items() if total[k])])


def main(reports: Path) -> str:
    stages = []
    total = 0
    times = reports / "times"
    for line in times.read_text().splitlines() if times.exists() else []:
        stage, seconds, rc = line.split()
        total += int(seconds)
        what = counts(reports / f"{stage}.xml") + " " if (reports / f"{stage}.xml").exists() else ""
        verdict = "ok" if rc == "0" else f"FAILED (exit {rc})"
        stages.append(f"{stage} {what}{seconds}s {verdict}")
    return "make test: " + " | ".join(stages) + f" | total {total}s"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
