"""Optional API keys: one per line in a file (a mounted Secret), `#` comments; re-read when it changes."""

from __future__ import annotations

import contextlib
import hmac
import os
from pathlib import Path


class ApiKeys:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        self._load()  # fail at start-up, not on the first request, if the file is unreadable

    def _load(self) -> None:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        lines = self.path.read_text().splitlines()
        self._keys = tuple(k.encode() for line in lines if (k := line.strip()) and not k.startswith("#"))
        self._stamp = stamp

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization: Bearer KEY` header carries a current key (compared in constant time)."""
        with contextlib.suppress(OSError):  # keep the keys last read: a Secret update swaps the file
            self._load()
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization.removeprefix("Bearer ").strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)
