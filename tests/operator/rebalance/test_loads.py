"""loads.py: a leader's expert load is untrusted input."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.rebalance.loads import MAX_ERROR, GroupLoad, LoadError, parse_group_load, summed


def doc(tokens: list[list[int]], *, ranks: int = 2, per_rank: int = 4, generation: int = 0) -> dict[str, Any]:
    n = len(tokens[0])
    slots = [e % n for e in range(ranks * per_rank)]
    return {
        "window_seconds": 300,
        "span_seconds": 12.5,
        "layers": [
            {"layer": i + 1, "tokens": t, "imbalance": 1.0, "slots": slots} for i, t in enumerate(tokens)
        ],
        "placement": {
            "ranks": ranks,
            "experts_per_rank": n // ranks,
            "slots_per_rank": per_rank,
            "redundant": ranks * per_rank - n,
            "generation": generation,
            "pending_generation": None,
        },
    }


def test_a_good_document_reads() -> None:
    g = parse_group_load(doc([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert isinstance(g, GroupLoad)
    assert g.layers == (1,)
    assert g.n_experts == 8
    assert g.redundant == 0
    assert g.slots[0] == tuple(range(8))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("placement"), "placement"),
        (lambda d: d["placement"].update(ranks=0), "placement.ranks"),
        (lambda d: d["placement"].update(generation=-1), "placement.generation"),
        (lambda d: d["placement"].update(generation=True), "placement.generation"),
        (lambda d: d.update(window_seconds=float("nan")), "window_seconds"),
        (lambda d: d.update(layers=[]), "layers"),
        (lambda d: d["layers"][0]["tokens"].__setitem__(3, -5), "layers[0].tokens[3]"),
        (lambda d: d["layers"][0]["tokens"].__setitem__(3, "many"), "layers[0].tokens[3]"),
        (lambda d: d["layers"][0]["slots"].__setitem__(0, 99), "layers[0].slots[0]"),
        (lambda d: d["layers"][0]["slots"].pop(), "layers[0].slots"),
        (lambda d: d["layers"][0]["slots"].__setitem__(0, 1), "without a slot"),
        (lambda d: d["layers"].append(copy.deepcopy(d["layers"][0])), "repeats"),
        (lambda d: d["placement"].update(error={"why": "oom"}), "placement.error"),
    ],
)
def test_a_bad_document_names_the_field(edit: Any, field: str) -> None:
    d = doc([[1, 2, 3, 4, 5, 6, 7, 8]])
    edit(d)
    with pytest.raises(LoadError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_group_load(d)


def test_the_error_of_a_generation_given_up_is_read_one_line_and_bounded() -> None:
    """The torch engine's placement.error (serve/placement_switch.py): why the last generation it gave up
    was not applied; null (or left out, by an older engine) when none was."""
    assert parse_group_load(doc([[1] * 8])).error is None
    d = doc([[1] * 8])
    d["placement"]["error"] = None
    assert parse_group_load(d).error is None
    d["placement"]["error"] = ""
    assert parse_group_load(d).error is None
    why = "generation 2 was not applied (generation 1 stays): rank 1: OutOfMemoryError:\n  CUDA out of memory"
    d["placement"]["error"] = why
    assert parse_group_load(d).error == (
        "generation 2 was not applied (generation 1 stays): rank 1: OutOfMemoryError: CUDA out of memory"
    )
    d["placement"]["error"] = "x" * 100_000
    assert parse_group_load(d).error == "x" * MAX_ERROR


def test_groups_add_up_and_must_agree() -> None:
    a = parse_group_load(doc([[1] * 8, [2] * 8]))
    b = parse_group_load(doc([[3] * 8, [4] * 8]))
    assert summed([a, b]) == ((4,) * 8, (6,) * 8)
    other = parse_group_load(doc([[1] * 8, [2] * 8], ranks=4, per_rank=2))
    with pytest.raises(LoadError, match="different layers or layouts"):
        summed([a, other])
