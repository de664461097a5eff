"""How a router pod ends: a preStop sleep, then the router's drain, inside the grace period.

Engine pods keep Kubernetes' defaults for now. Rendered for them too (leaders sleeping, the torch
server draining), the real-node e2e found a deleted decode worker no longer ejected from the router
within 5 s: the group's failure must reach the router before any drain, which needs the leader to
notice a lost rank at once. Until that is built and measured, what follows applies to the router.

When a pod is deleted (a rolling update, a scale-down, a node drain) Kubernetes runs its preStop
hook, then sends SIGTERM, then SIGKILL once terminationGracePeriodSeconds have passed since the start.

- preStop sleeps PRESTOP_SLEEP_S, with the kubelet's own `sleep` action (GA in Kubernetes 1.34, on
  by default since 1.30; the runtime images need no `sleep` binary): meanwhile the pod still serves
  while the EndpointSlice controller and kube-proxy take it out of the front Service, so clients'
  new connections stop reaching it before it stops taking requests. Only pods that serve the API
  (the router's, Deployment pods, LeaderWorkerSet leaders) sleep: a headless LeaderWorkerSet worker
  is in no Service, and stops at once on SIGTERM: its StatefulSet is owned by the leader pod, so
  when a group goes as a whole the garbage collector removes the workers once the leader has
  drained and gone (the leader ending the group stops them first); a worker deleted alone has broken
  its group, which should then fail fast (the router ejects it, LeaderWorkerSet recreates it).
- On SIGTERM the runtime drains (kubemoe_runtime/pod/drain.py): /ready and new requests answer
  503 (the router ejects such a backend at once and retries elsewhere; the role's headless Service
  publishes not-ready pods, so this, not the endpoints, is what stops the router), requests in
  flight finish, for at most DRAIN_TIMEOUT_S ($KUBEMOE_DRAIN_TIMEOUT_S, set here on every pod).
- EXIT_MARGIN_S covers what follows the drain: uvicorn's last 5 s, the engine thread's and the
  rank processes' teardown, the router's closing connections.

GRACE_PERIOD_S = PRESTOP_SLEEP_S + DRAIN_TIMEOUT_S + EXIT_MARGIN_S: a request that was in flight
when the pod was deleted has the whole drain timeout, and nothing is SIGKILLed in normal operation.
"""

from __future__ import annotations

from typing import Any, Final

PRESTOP_SLEEP_S: Final = 5
"""Endpoint propagation: the EndpointSlice update and every node's kube-proxy sync usually take
about a second; 5 s leaves room on a busy control plane without slowing rollouts much."""
DRAIN_TIMEOUT_S: Final = 120
"""A few thousand tokens at tens of tokens a second; the runtime's default is the same
(kubemoe_runtime.pod.drain.DRAIN_TIMEOUT_S, checked by a test)."""
EXIT_MARGIN_S: Final = 15
GRACE_PERIOD_S: Final = PRESTOP_SLEEP_S + DRAIN_TIMEOUT_S + EXIT_MARGIN_S
DRAIN_TIMEOUT_ENV: Final = "KUBEMOE_DRAIN_TIMEOUT_S"
"""The runtime's --drain-timeout default (kubemoe_runtime.pod.drain.DRAIN_TIMEOUT_ENV). An
environment variable rather than a flag: a runtime image older than this operator ignores it, where
an unknown flag would reach vLLM and stop it."""


def drain_env() -> list[dict[str, Any]]:
    return [{"name": DRAIN_TIMEOUT_ENV, "value": str(DRAIN_TIMEOUT_S)}]


def container_lifecycle() -> dict[str, Any]:
    """The serving container's preStop hook."""
    return {"lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}}}


def pod_termination() -> dict[str, Any]:
    """The pod spec's grace period."""
    return {"terminationGracePeriodSeconds": GRACE_PERIOD_S}
