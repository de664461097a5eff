"""Plain-text tables for the terminal, as kubectl prints them: left-aligned columns, two spaces apart."""

from __future__ import annotations

from collections.abc import Sequence


def grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The header and rows as aligned lines, trailing spaces stripped."""
    table = [list(map(str, header)), *(list(map(str, row)) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
