"""Probes of the runtime's pods, sized for weight loads that take many minutes.

The runtime answers GET /health (the process and its engine live) and GET /ready (every rank of
the group has loaded its weights; a headless worker: its own ranks run) on every serving pod,
leaders and LeaderWorkerSet workers alike. In front of vLLM each answer may wait for vLLM's own
/health: up to HANDLER_WAIT_S (connect and read, 5 s each), so every probe's timeout is longer
than that (tests/operator/render/test_render_pods.py checks it against the runtime's constant).

- startupProbe on /ready: liveness and readiness wait until the weights are loaded, for up to
  STARTUP_BUDGET_S; a pod still loading after that is restarted.
- livenessProbe on /health: a dead engine restarts the container (for a LeaderWorkerSet, its group).
- readinessProbe on /ready: only loaded groups receive traffic.
The router loads nothing: it gets no startup probe.
"""

from __future__ import annotations

from typing import Any

HANDLER_WAIT_S = 10
"""The longest a runtime /health or /ready handler waits (vLLM front: connect + read, 5 s each)."""
TIMEOUT_S = HANDLER_WAIT_S + 2
STARTUP_PERIOD_S = 5
"""Often enough that a pod that loads in seconds serves in seconds (a probe is one local GET):
at 15 s the tiny model on a real node took 17 s from `kubectl apply` to its first token, against
4 s for a hand-written Deployment of the same image without probes."""
STARTUP_BUDGET_S = 2 * 3600
"""How long a pod may take to load its weights (hundreds of GB from a hub or a claim)."""
LIVENESS_PERIOD_S = 20
LIVENESS_FAILURES = 3
READINESS_PERIOD_S = 5
READINESS_FAILURES = 3


def _get(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": TIMEOUT_S,
        "failureThreshold": failures,
    }


def engine_probes() -> dict[str, Any]:
    """Startup, liveness and readiness probes of a serving pod (leader or worker)."""
    return {
        "startupProbe": _get(
            "/ready", period=STARTUP_PERIOD_S, failures=STARTUP_BUDGET_S // STARTUP_PERIOD_S
        ),
        **router_probes(),
    }


def router_probes() -> dict[str, Any]:
    """Liveness and readiness probes (no startup probe: nothing to load)."""
    return {
        "livenessProbe": _get("/health", period=LIVENESS_PERIOD_S, failures=LIVENESS_FAILURES),
        "readinessProbe": _get("/ready", period=READINESS_PERIOD_S, failures=READINESS_FAILURES),
    }
