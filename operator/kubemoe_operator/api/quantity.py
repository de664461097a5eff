"""Kubernetes resource quantities (e.g. 512Mi, 2Gi, 1.5G) as numbers."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
MAX_QUANTITY = 2**63 - 1  # what the API server stores (in milli-units for small values)
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([-+]?[0-9]+))?([a-zA-Z]*)$")


def _check_int(value: int) -> float:
    """A quantity given as a YAML integer: the same bounds as the string form."""
    if value < 0:
        raise ValueError(f"{value} is negative; a resource quantity is at least 0 (e.g. 4, 512Mi)")
    if value > MAX_QUANTITY:
        digits = len(str(value)) if value.bit_length() < 4000 else round(value.bit_length() * math.log10(2))
        raise ValueError(
            f"an integer of {digits} digits is larger than any Kubernetes quantity (at most {MAX_QUANTITY})"
        )
    return float(value)


def parse_quantity(value: int | str) -> float:
    """'2Gi' -> 2147483648.0; raises ValueError for anything Kubernetes would reject, negative
    quantities included (a pod's requests and limits, a claim's size)."""
    if isinstance(value, int):
        return _check_int(value)
    if value.strip().startswith("-"):
        raise ValueError(f"{value!r} is negative; a resource quantity is at least 0 (e.g. 4, 512Mi)")
    match = _QUANTITY.match(value.strip())
    if match is None or match.group(3) not in _SUFFIXES:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 512Mi, 2Gi)")
    try:
        number = float(match.group(1)) * 10.0 ** int(match.group(2) or 0) * _SUFFIXES[match.group(3)]
    except OverflowError:
        number = math.inf
    if number > MAX_QUANTITY:
        raise ValueError(f"{value!r} is larger than any Kubernetes quantity (at most about 9.2E)")
    return number


def milli_units(value: int | str) -> int:
    """A quantity exactly, as the API server stores it: whole milli-units, rounded up ('0.7' and
    '700m' -> 700). Floats would tell those two apart (0.7 against 0.7000000000000001)."""
    parse_quantity(value)  # the checks, and the same errors
    if isinstance(value, int):
        return value * 1000
    match = _QUANTITY.match(value.strip())
    assert match is not None
    exponent = max(int(match.group(2) or 0), -64)  # anything smaller is under 1m: rounds up to it
    suffix = Fraction(str(_SUFFIXES[match.group(3)]))  # "0.001", not the float 0.001
    exact = Fraction(match.group(1)) * Fraction(10) ** exponent * suffix * 1000
    return math.ceil(exact)
