"""What a fault test measured, kept in the JUnit report for the README's reliability table.

A fault test ends with `record(record_property, Outcome(...))`: the fault it caused, what the client saw,
the requests lost and the seconds until the system served again. pytest writes them as <property>
elements of the test's <testcase> (`--junitxml`, which `make test` passes); `python -m
e2e.reliability_table` turns every report's outcomes into the README's table, with whether the test
held (passed). Record only what the test measured: the table is only as true as these values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Final

RecordProperty = Callable[[str, object], None]
"""pytest's record_property fixture."""
PREFIX: Final = "reliability."
FIELDS: Final = ("fault", "client_saw", "lost", "recover_s")


@dataclass(frozen=True)
class Outcome:
    fault: str
    """What the test did, in a few words ("a backend SIGKILLed mid-stream under 32 streams")."""
    client_saw: str
    """What a client of the API (or a user of kubectl) saw."""
    lost: str
    """Requests lost, counted ("0 of 64", "12 of 32 streams, cut with an error event; 0 not yet sent")."""
    recover_s: float | None
    """Seconds from the fault until it served (or reconciled) again; None when nothing stopped."""


def record(record_property: RecordProperty, outcome: Outcome) -> None:
    for name, value in asdict(outcome).items():
        text = "" if value is None else f"{value:.1f}" if name == "recover_s" else str(value)
        record_property(PREFIX + name, text)
