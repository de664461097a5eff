"""A problem with a manifest: the field at fault, what is wrong, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Problem:
    field: str
    """Dotted path from the object root, e.g. spec.roles.decode.parallelism.expert."""
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}"
        return f"{text} Fix: {self.fix}" if self.fix else text


class ManifestError(Exception):
    """The manifest cannot be deployed; every problem found is listed."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
