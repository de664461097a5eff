"""Optional API keys: one per line in a file (a mounted Secret), `#` comments; re-read when it changes."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger("kubemoe_runtime.router")


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
        data = self.path.read_bytes()
        self._stamp = stamp  # read once, good or bad, until it changes
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"the API key file {self.path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                "write one key a line"
            ) from None
        self._keys = tuple(k.encode() for line in lines if (k := line.strip()) and not k.startswith("#"))

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization: Bearer KEY` header carries a current key (compared in constant time)."""
        try:  # keep the keys last read while the file is being swapped (a Secret update) or is unusable
            self._load()
        except OSError:
            pass
        except ValueError as err:  # logged once: it is not read again until it changes
            log.warning("router: keeping the API keys last read: %s", err)
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization.removeprefix("Bearer ").strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)
