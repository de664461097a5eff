"""The torch engine pod's timeouts: the group's (joining and loading, every serving collective, the engine
thread's heartbeat, a placement's load; `Timeouts`, the serving ones from the environment) and the waits of
its ending (pod_process.py's `PodProcess.finish`, engine_thread.py, pod.py's `serve`).

Joining the group, loading the weights and the barrier after the load run under GROUP_TIMEOUT
(30 minutes: the slowest rank's load). Then each rank sets its process group's timeout to the serving
timeout (SERVING_TIMEOUT_S, 120 s; KUBEMOE_COLLECTIVE_TIMEOUT_S overrides it), the limit of every serving
collective: a rank that stays connected but goes silent (stuck in a device call, partitioned, its node
gone without a FIN) fails the others' next collective within it, and a rank whose collective fails fails
its pod as a lost rank does (/health 500, exit 1; the leader aborts its requests). A collective waits for
the slowest rank to reach it: at most what one rank computes between two collectives (one decoder layer,
with its attention over a step's longest prompt) or what rank 0 does between two messages (a keepalive
every KEEPALIVE_S when idle). 120 s holds one layer of a prompt tens of thousands of tokens long on a small
CPU budget, and fails a stuck group well inside the router's 600 s request timeout (a silent rank held
rank 0 for the half hour before). The engine thread's heartbeat (group.py) fails /health (and /ready) when
it has made no progress for the serving timeout and STALL_MARGIN_S more (KUBEMOE_ENGINE_STALL_S
overrides the sum): a thread stuck where no collective times out (a device call, say) is restarted by
the liveness probe. A placement that is still loading LOAD_TIMEOUT_S after it began is aborted
(placement_switch.py; KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S overrides it).

A pod that ends gives each child rank CHILD_JOIN_S to exit (FAILED_JOIN_S once the pod failed), then
TERMINATE_WAIT_S after SIGTERM, then kills it; a failed pod's rank 0 waits FAILED_LEAVE_S for the group's
other ranks to leave.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

from kubemoe_runtime.engines.torch.serve.placement_switch import LOAD_TIMEOUT_S

GROUP_TIMEOUT = timedelta(minutes=30)  # joining and loading: covers the slowest rank's weight loading
SERVING_TIMEOUT_S = 120.0  # every collective once serving (the module docstring says why)
STALL_MARGIN_S = 30.0  # the heartbeat's limit: the serving timeout and this (a collective's own error first)
KEEPALIVE_S = 2.0
CHILD_JOIN_S = 15.0  # a rank ending with its group (rank 0's Shutdown) exits within this
FAILED_JOIN_S = 2.0  # the same, once the pod failed: its ranks may be frozen or blocked in a collective
TERMINATE_WAIT_S = 2.0  # after SIGTERM; then SIGKILL
FAILED_LEAVE_S = 2.0  # a failed pod's rank 0 waits this long for the group's other ranks to leave too
SERVING_TIMEOUT_ENV = "KUBEMOE_COLLECTIVE_TIMEOUT_S"
STALL_ENV = "KUBEMOE_ENGINE_STALL_S"
PLACEMENT_TIMEOUT_ENV = "KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S"


@dataclass(frozen=True)
class Timeouts:
    """The serving timeouts, in seconds (the module docstring): from the environment, or the defaults."""

    collective_s: float = SERVING_TIMEOUT_S
    stall_s: float = SERVING_TIMEOUT_S + STALL_MARGIN_S
    placement_load_s: float = LOAD_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Timeouts:
        """ValueError naming the variable for one that is not a positive number of seconds."""
        collective = _seconds(SERVING_TIMEOUT_ENV, SERVING_TIMEOUT_S)
        return cls(
            collective_s=collective,
            stall_s=_seconds(STALL_ENV, collective + STALL_MARGIN_S),
            placement_load_s=_seconds(PLACEMENT_TIMEOUT_ENV, LOAD_TIMEOUT_S),
        )


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={raw!r}: expected a positive number of seconds")
    return value
