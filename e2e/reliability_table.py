"""The README's reliability table, from the fault tests' JUnit reports (e2e/reliability.py).

    python -m e2e.reliability_table [REPORT.xml ...] [--readme README.md]

Reads every <testcase> that recorded an Outcome, in the reports' order (a later report's row for the
same test replaces an earlier one, so a rerun of one suite can update a full run's table), and prints
a Markdown table:
the fault, what the client saw, requests lost, time to recover, and whether the test held (passed).
With --readme the table replaces what stands between the README's two markers (RELIABILITY_START and
RELIABILITY_END), so the README shows the last full run; `make reliability` runs it on `make test`'s
reports. Default reports: .reports/unit.xml and .reports/e2e.xml.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from e2e.reliability import FIELDS, PREFIX

RELIABILITY_START: Final = (
    "<!-- reliability-table: start (python -m e2e.reliability_table --readme README.md) -->"
)
RELIABILITY_END: Final = "<!-- reliability-table: end -->"
DEFAULT_REPORTS: Final = (Path(".reports/unit.xml"), Path(".reports/e2e.xml"))
HEADER: Final = ("Fault", "What the client saw", "Requests lost", "Recovered in", "Held", "Test")


@dataclass(frozen=True)
class Row:
    test: str
    held: str
    values: dict[str, str]


def rows(report: Path) -> list[Row]:
    """The outcomes one JUnit report recorded (testcases without one are not fault tests)."""
    found: list[Row] = []
    for case in ET.parse(report).getroot().iter("testcase"):
        values = {
            prop.get("name", "")[len(PREFIX) :]: prop.get("value", "")
            for prop in case.iter("property")
            if prop.get("name", "").startswith(PREFIX)
        }
        if not values:
            continue
        failed = any(case.find(tag) is not None for tag in ("failure", "error"))
        skipped = case.find("skipped") is not None
        held = "no" if failed else "not run" if skipped else "yes"
        test = f"{case.get('classname', '')}::{case.get('name', '')}".rsplit(".", 1)[-1]
        found.append(Row(test=test, held=held, values=values))
    return found


def table(found: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in found:
        v = {name: _cell(row.values.get(name, "")) for name in FIELDS}
        recover = f"{v['recover_s']} s" if v["recover_s"] else "n/a"
        cells = (v["fault"], v["client_saw"], v["lost"], recover, row.held, f"`{row.test}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """`text` with what stands between the markers replaced by `section`; ValueError without them."""
    start, end = text.find(RELIABILITY_START), text.find(RELIABILITY_END)
    if start < 0 or end < start:
        raise ValueError(
            f"the README has no reliability markers: add the lines\n{RELIABILITY_START}\n{RELIABILITY_END}"
        )
    head = text[: start + len(RELIABILITY_START)]
    return f"{head}\n{section}{text[end:]}"


def _cell(value: str) -> str:
    return " ".join(value.split()).replace("|", "\\|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.reliability_table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("reports", nargs="*", type=Path, help="JUnit XML reports (default: .reports/*.xml)")
    parser.add_argument("--readme", type=Path, help="write the table into this README between its markers")
    args = parser.parse_args(argv)
    reports = args.reports or [p for p in DEFAULT_REPORTS if p.exists()]
    if not reports:
        print("error: no JUnit reports: run `make test` first, or name them", file=sys.stderr)
        return 2
    by_test: dict[str, Row] = {}
    for report in reports:
        try:
            by_test |= {row.test: row for row in rows(report)}
        except (OSError, ET.ParseError) as err:
            print(f"error: {report}: {err}", file=sys.stderr)
            return 2
    found = list(by_test.values())
    if not found:
        print(f"error: no fault test recorded an outcome in {', '.join(map(str, reports))}", file=sys.stderr)
        return 1
    section = table(found)
    if args.readme is None:
        sys.stdout.write(section)
        return 0
    try:
        args.readme.write_text(replace_section(args.readme.read_text(), section))
    except ValueError as err:
        print(f"error: {args.readme}: {err}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {len(found)} fault tests from {len(reports)} report(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
