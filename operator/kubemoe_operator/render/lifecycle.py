"""How a serving pod ends: a preStop sleep, then the runtime's drain, inside the grace period.

Which pods: those that serve the API, namely the router's and the engines' API-serving pods
(single-pod groups' Deployment pods and LeaderWorkerSet leaders, torch or vLLM; `drains`). Headless
workers keep Kubernetes' defaults (no preStop, no drain timeout, the default 30 s grace period):

- a headless LeaderWorkerSet worker is in no Service and has no requests of its own, so its runtime
  does not drain: on SIGTERM it leaves its group at once (kubemoe_runtime/serve.py). Its StatefulSet
  is owned by the leader pod, so when a group goes as a whole (a rollout, a scale-down) the workers
  outlive the leader's drain and stop when it ends the group; a worker deleted alone has broken its
  group, which must fail fast, before the leader's own preStop sleep is over: its sockets closing
  fail the leader's next collective or keepalive (2 s), the leader answers /ready 503 and exits, the
  router ejects the group (e2e/test_real_serving.py: within 5 s; 2.9 s measured) and LeaderWorkerSet
  recreates it. Measured on the real node: a worker that stayed in its group after SIGTERM (as it
  did, waiting for rank 0, for up to 30 s) left the group serving past the leader's 5 s sleep.
- a vLLM pod's front (kubemoe_runtime/engines/vllm/supervise.py) drains as the torch server does,
  then forwards SIGTERM to vLLM, which gets GRACE_S (25 s) to stop before it is killed; a headless
  vLLM worker forwards it at once.

When a pod is deleted (a rolling update, a scale-down, a node drain) Kubernetes runs its preStop
hook, then sends SIGTERM, then SIGKILL once terminationGracePeriodSeconds have passed since the start.

- preStop sleeps PRESTOP_SLEEP_S, with the kubelet's own `sleep` action (GA in Kubernetes 1.34, on
  by default since 1.30; the runtime images need no `sleep` binary): meanwhile the pod still serves
  while the EndpointSlice controller and kube-proxy take it out of the front Service, so clients'
  new connections stop reaching it before it stops taking requests.
- On SIGTERM the runtime drains (kubemoe_runtime/pod/drain.py): /ready and new requests answer
  503 (the router ejects such a backend at once and retries elsewhere; the role's headless Service
  publishes not-ready pods, so this, not the endpoints, is what stops the router), requests in
  flight finish, for at most DRAIN_TIMEOUT_S ($KUBEMOE_DRAIN_TIMEOUT_S, set here on every pod that
  drains). A torch leader whose group fails while it drains exits at once.
- EXIT_MARGIN_S covers what follows the drain: uvicorn's last 5 s, the engine thread's and the
  rank processes' teardown, vLLM's own stop (the front's GRACE_S, 25 s), the router's closing
  connections.

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
EXIT_MARGIN_S: Final = 30
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


def drains(*, leader: bool) -> bool:
    """Whether an engine pod sleeps in preStop, drains and gets GRACE_PERIOD_S: an API-serving pod
    (`leader`) of either engine (the torch server, the vLLM front), not a headless worker."""
    return leader
