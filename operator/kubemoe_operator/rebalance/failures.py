"""A placement the groups of a role gave up (their load documents' placement.error, or a POST of it
refused), as the rebalancer's loop (loop.py) keeps count of it: how many checks found a group had, the
last error, and whether it is given up (MAX_PLACEMENT_TRIES); and the generation numbers the groups'
errors name."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemoe_operator.rebalance.loads import GroupLoad

MAX_PLACEMENT_TRIES = 3
"""Checks that find a group gave a generation up before it is given up (loop.py's docstring)."""


@dataclass
class PlacementFailure:
    """A placement the role's groups gave up (their load documents' placement.error, or their answer to
    its POST)."""

    generation: int
    layers: Any
    """The placement document's layers: what tells this placement from a later one of that number."""
    key: str
    """The ConfigMap key (the groups' layout) it was written under."""
    spec_generation: int | None
    """The ModelDeployment's metadata.generation then: a spec change forgets it."""
    tries: int = 0
    """Checks that found a group had given it up."""
    error: str = ""
    """The last such group's error, with its pod."""

    def matches(self, placement: Mapping[str, Any]) -> bool:
        return placement.get("generation") == self.generation and placement.get("layers") == self.layers

    @property
    def given_up(self) -> bool:
        return self.tries >= MAX_PLACEMENT_TRIES

    def summary(self) -> str:
        if self.given_up:
            return (
                f"placement generation {self.generation} failed {self.tries} times, not sent again until "
                f"another placement is chosen or the spec changes: {self.error}"
            )
        tries = f"try {self.tries} of {MAX_PLACEMENT_TRIES}"
        return f"placement generation {self.generation} failed ({tries}): {self.error}"


def gave_up(load: GroupLoad, generation: int) -> bool:
    """The group gave `generation` up: nothing loading, and an error that (where it says which
    generation, as the torch engine's does) names that generation."""
    if load.pending_generation is not None or load.error is None:
        return False
    named = _GAVE_UP.match(load.error)
    return named is None or int(named.group(1)) == generation


_GAVE_UP = re.compile(r"generation (\d+) was not applied")
"""The torch engine's words (serve/placement_switch.py); an error in other words counts as well."""


def named_generation(load: GroupLoad) -> int:
    """The generation the group's error says it gave up (0 where it names none)."""
    named = _GAVE_UP.match(load.error or "")
    return int(named.group(1)) if named is not None else 0


RETRIED_ANSWERS = frozenset({408, 409, 429})
"""4xx answers to a placement POST that a later try may get past (409: the group loads another one)."""


def refusal(status: int, text: str) -> str | None:
    """What a group said when it refused a placement document for good (a 4xx answer but
    RETRIED_ANSWERS: the document does not fit the group, and sending it again gets the same answer):
    the OpenAI-shaped error's message where there is one. None for any other answer."""
    if not 400 <= status < 500 or status in RETRIED_ANSWERS:
        return None
    try:
        detail = json.loads(text)["error"]
        message = detail["message"] if isinstance(detail, dict) else detail
    except (ValueError, KeyError, TypeError):
        message = text
    said = " ".join(str(message).split())[:300] or "no reason given"
    return f"answered {status} to placement POST: {said}"
