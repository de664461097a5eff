"""The README's troubleshooting table documents every condition reason the operator sets."""

from __future__ import annotations

from pathlib import Path

from kubemoe_operator import status
from kubemoe_operator.autoscale import loop

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_condition_reason_is_in_the_troubleshooting_table() -> None:
    text = README.read_text()
    table = text[text.index("## Troubleshooting") :]
    reasons = {
        v
        for module in (status, loop)
        for k, v in vars(module).items()
        if k.startswith("REASON_") and isinstance(v, str)
    }
    assert reasons
    missing = sorted(r for r in reasons if f"`{r}`" not in table)
    assert not missing, f"document these reasons in README.md's troubleshooting table: {missing}"
