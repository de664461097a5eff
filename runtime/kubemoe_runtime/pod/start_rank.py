"""`--data-parallel-start-rank auto`: a pod's first data-parallel rank from its LeaderWorkerSet index.

A LeaderWorkerSet renders every worker pod of a group from one template, so the operator cannot write a
different start rank into each. With `auto`, a pod takes LWS_WORKER_INDEX (which LWS sets in every pod
of a group: 0 for the leader, 1..size-1 for the workers) times its --data-parallel-size-local:

    pod i of a group with L local ranks each runs ranks i*L .. i*L + L - 1

A number is taken as given (single-pod groups, `kubemoe up`, tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

AUTO: Final = "auto"
LWS_WORKER_INDEX: Final = "LWS_WORKER_INDEX"


class StartRankError(ValueError):
    """--data-parallel-start-rank cannot be resolved; the message says why."""


def resolve_start_rank(value: str | int, *, local: int, env: Mapping[str, str] | None = None) -> int:
    """The first data-parallel rank this pod runs: `value` as a number, or from LWS_WORKER_INDEX if `auto`."""
    if isinstance(value, int) or value.strip() != AUTO:
        try:
            rank = int(value)
        except ValueError:
            raise StartRankError(
                f"--data-parallel-start-rank must be a number or {AUTO!r}, not {value!r}"
            ) from None
        if rank < 0:
            raise StartRankError(f"--data-parallel-start-rank must not be negative, not {rank}")
        return rank
    env = os.environ if env is None else env
    index = env.get(LWS_WORKER_INDEX)
    if index is None:
        raise StartRankError(
            f"--data-parallel-start-rank {AUTO} needs ${LWS_WORKER_INDEX} (LeaderWorkerSet sets it)"
        )
    if not index.strip().isdigit():
        raise StartRankError(f"${LWS_WORKER_INDEX} must be a non-negative integer, not {index!r}")
    return int(index) * local
