"""Load progress (#20): how far one rank's load of its weights has got.

A `LoadProgress` given to `load_rank_weights` (rank_weights.py) learns the bytes the rank will read once
the headers are checked (before a byte of data), then counts each readinto() (tensor_reads.py); it logs
bytes done/total and the percentage at least every LOG_EVERY_S seconds or every LOG_EVERY_FRACTION of the
total, whichever comes first, and any thread may read it (the pod's `/ready` answers with it while the rank
loads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from kubemoe_runtime.pod.messages import human_bytes

log = logging.getLogger("kubemoe_runtime.load")

LOG_EVERY_S: Final = 5.0  # LoadProgress logs at least this often while bytes arrive ...
LOG_EVERY_FRACTION: Final = 0.1  # ... and at each further tenth of the total


class LoadProgress:
    """How far one rank's load has got: bytes read of the bytes it plans to read (0 of 0 until the plan is
    known). Written by the loading thread (`plan`, `advance`), read by any (`snapshot`, `as_json`); it
    logs progress as it goes (the module docstring says how often)."""

    def __init__(
        self,
        *,
        label: str = "rank 0",
        log_every_s: float = LOG_EVERY_S,
        log_every_fraction: float = LOG_EVERY_FRACTION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.log_every_s = log_every_s
        self.log_every_fraction = log_every_fraction
        self.clock = clock
        self._lock = threading.Lock()
        self._bytes = 0
        self._total = 0
        self._logged_at = 0.0
        self._logged_bytes = 0
        self._started = 0.0

    def plan(self, total: int) -> None:
        """The load will read `total` bytes (nothing read yet)."""
        with self._lock:
            self._bytes, self._total = 0, total
            self._started = self._logged_at = self.clock()
            self._logged_bytes = 0
        log.warning("kubemoe-runtime: %s: loading weights: %s to read", self.label, human_bytes(total))

    def advance(self, n: int) -> None:
        """`n` more bytes were read; logs when a tenth more of the total or LOG_EVERY_S have passed."""
        with self._lock:
            self._bytes = min(self._bytes + n, self._total)
            done, total, now = self._bytes, self._total, self.clock()
            step = max(1, int(total * self.log_every_fraction))
            due = (
                done == total
                or done - self._logged_bytes >= step
                or now - self._logged_at >= self.log_every_s
            )
            if due:
                self._logged_at, self._logged_bytes = now, done
            elapsed = now - self._started
        if due:
            log.warning(
                "kubemoe-runtime: %s: loading weights: %s of %s (%d%%) in %.1f s",
                self.label,
                human_bytes(done),
                human_bytes(total),
                100 * done // max(total, 1),
                elapsed,
            )

    def snapshot(self) -> tuple[int, int]:
        """(bytes read, bytes planned)."""
        with self._lock:
            return self._bytes, self._total

    def as_json(self) -> dict[str, int]:
        done, total = self.snapshot()
        return {"bytes": done, "bytesTotal": total}
