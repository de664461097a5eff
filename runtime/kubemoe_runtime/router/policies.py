"""How the router picks a backend for a request. Pure: tested without a network.

round-robin  each healthy backend in turn
least-load   the fewest outstanding requests (ties in turn)
prefix-hash  consistent hashing of the prompt's prefix with bounded load (Mirrokni, Thorup and
             Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018): a request goes to the
             first backend clockwise of its key on a ring of virtual nodes whose outstanding requests
             stay below ceil((1 + eps) * (total outstanding + 1) / backends). The same prefix keeps
             landing on the same backend (its prefix cache stays warm) unless that backend is
             overloaded; a backend joining or leaving moves only the keys next to it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

POLICIES = ("round-robin", "least-load", "prefix-hash")
VIRTUAL_NODES = 64
LOAD_BOUND_EPS = 0.25


class Target(Protocol):
    @property
    def address(self) -> str: ...

    @property
    def outstanding(self) -> int: ...


class Policy(Protocol):
    def choose(self, backends: Sequence[Target], *, key: str) -> int:
        """The index of the chosen backend among `backends` (non-empty)."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, backends: Sequence[Target], *, key: str) -> int:
        index = self._next % len(backends)
        self._next = index + 1
        return index


class LeastLoad:
    def __init__(self) -> None:
        self._rotation = 0

    def choose(self, backends: Sequence[Target], *, key: str) -> int:
        n = len(backends)
        fewest = min(b.outstanding for b in backends)
        index = next(
            i % n for i in range(self._rotation, self._rotation + n) if backends[i % n].outstanding == fewest
        )
        self._rotation = index + 1
        return index


def hash64(text: str) -> int:
    """surrogatepass: a client's prompt may hold a lone surrogate (JSON's "\\ud800"), which UTF-8 cannot
    carry; it still hashes, to the same point every time."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixHash:
    def __init__(self, *, virtual_nodes: int = VIRTUAL_NODES, eps: float = LOAD_BOUND_EPS) -> None:
        self.virtual_nodes = virtual_nodes
        self.eps = eps
        self._members: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, addresses: tuple[str, ...]) -> None:
        if addresses == self._members:
            return
        ring = sorted((hash64(f"{a}#{v}"), a) for a in addresses for v in range(self.virtual_nodes))
        self._members = addresses
        self._points = [p for p, _ in ring]
        self._owners = [a for _, a in ring]

    def capacity(self, backends: Sequence[Target]) -> int:
        total = sum(b.outstanding for b in backends) + 1
        return math.ceil((1 + self.eps) * total / len(backends))

    def choose(self, backends: Sequence[Target], *, key: str) -> int:
        index = {b.address: i for i, b in enumerate(backends)}
        self._ring(tuple(sorted(index)))
        cap = self.capacity(backends)
        start = bisect.bisect(self._points, hash64(key))
        seen: set[str] = set()
        for step in range(len(self._points)):
            address = self._owners[(start + step) % len(self._points)]
            if address in seen:
                continue
            seen.add(address)
            if backends[index[address]].outstanding < cap:
                return index[address]
        return min(range(len(backends)), key=lambda i: backends[i].outstanding)  # unreachable: cap > min


def make_policy(name: str) -> Policy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-load":
        return LeastLoad()
    if name == "prefix-hash":
        return PrefixHash()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
