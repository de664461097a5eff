"""kopf handlers: thin adapters that find the ModelDeployment to reconcile and call `reconcile`.

Triggers (all level-triggered; each reads the object fresh and reconciles it whole):
- create / update / resume of a ModelDeployment (spec changes; start-up);
- a change of status.roles.*.desired (the autoscaler's decision: autoscale/loop.py, a plain task
  that __main__ starts on the leader next to these handlers);
- any event on a child (label kubemoe.io/deployment): it re-reconciles its owner. The API server
  filters these watches by that label (`watch_labelled_children`): kopf applies a handler's `labels`
  in the operator, after it has listed and watched every object of the kind in the watched namespaces
  (with `watchNamespace: ''`, every ConfigMap, Service, Job... of the cluster, each kept in kopf's
  memory);
- a periodic resync of every ModelDeployment (a plain task, not a kopf timer: kopf timers put a
  finalizer on every object, which would block deletion while the operator is down).

Reconciles of one object never overlap, and bursts of child events coalesce into one.
Retryable API errors become kopf.TemporaryError (kopf retries the handler); a spec that cannot
work is reported in status conditions, not raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubemoe_operator.api.desired import desired_of, parse_status
from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, MANAGED_BY
from kubemoe_operator.api.resource import GROUP, PLURAL, VERSION
from kubemoe_operator.api.status import now_utc
from kubemoe_operator.kube.client import Kube, RejectedError, RetryableError, event_body
from kubemoe_operator.kube.kinds import CHILD_KINDS, ChildKind
from kubemoe_operator.reconcile.reconcile import ReconcileContext, Result, reconcile
from kubemoe_operator.run.metrics import OperatorMetrics
from kubemoe_operator.run.settings import OperatorSettings

log = logging.getLogger("kubemoe.handlers")

RETRY_DELAY_S = 5.0
REJECTED_RETRY_DELAY_S = 60.0
WATCH_CHUNK_SIZE = 500
"""Objects a page of kopf's initial LIST of a kind (the list is paginated, not one response)."""
Key = tuple[str, str]


@dataclass
class OperatorState:
    """What the handlers share: the API, the reconcile context, and per-object serialisation."""

    kube: Kube
    context: ReconcileContext
    settings: OperatorSettings
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    queued: set[Key] = field(default_factory=set)
    desired_seen: dict[Key, dict[str, int | None]] = field(default_factory=dict)
    resync: asyncio.Task[None] | None = None

    async def reconcile_key(self, key: Key, *, coalesce: bool) -> Result | None:
        """Reconcile `key` from a fresh read. With `coalesce`, skip if one is already waiting."""
        if coalesce and key in self.queued:
            return None
        self.queued.add(key)
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            self.queued.discard(key)
            namespace, name = key
            body = await self.kube.get_deployment(name=name, namespace=namespace)
            if body is None:
                self.locks.pop(key, None)
                self.desired_seen.pop(key, None)
                return None
            with self.metrics.reconcile_seconds.time():
                try:
                    result = await reconcile(kube=self.kube, body=body, context=self.context)
                except (RetryableError, RejectedError) as err:
                    self.metrics.reconciles.labels(result="error").inc()
                    self.metrics.reconcile_errors.labels(error=type(err).__name__).inc()
                    raise
            self.metrics.reconciles.labels(result="ok").inc()
            self.desired_seen[key] = result.desired
            await self._post(body, result)
            return result

    async def _post(self, body: dict[str, Any], result: Result) -> None:
        stamp = now_utc().strftime("%Y-%m-%dT%H:%M:%SZ")
        for d in result.decisions:
            await self.kube.post_event(
                event_body(
                    involved=body,
                    reason=d.reason,
                    message=d.message,
                    warning=d.warning,
                    component=MANAGED_BY,
                    now=stamp,
                )
            )

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            try:
                await self.resync_once()
            except Exception:  # the resync outlives any one failure (it logs, the next one retries)
                log.exception("resync failed; the next one retries")

    async def resync_once(self) -> None:
        namespaces: tuple[str | None, ...] = self.settings.namespaces or (None,)
        for namespace in namespaces:
            try:
                items = await self.kube.list_deployments(namespace=namespace)
            except (RetryableError, RejectedError) as err:
                log.warning("resync: %s", err)
                continue
            for item in items:
                meta = item["metadata"]
                try:
                    await self.reconcile_key((meta["namespace"], meta["name"]), coalesce=True)
                except (RetryableError, RejectedError) as err:
                    log.warning(
                        "resync of %s/%s: %s (next resync retries)", meta["namespace"], meta["name"], err
                    )
                except Exception:  # one object's failure must not skip the others
                    log.exception(
                        "resync of %s/%s failed (next resync retries)", meta["namespace"], meta["name"]
                    )


def child_resource(kind: ChildKind) -> tuple[str, str, str]:
    """(group, version, plural) of a child kind, as kopf's handlers and selectors name it."""
    group, _, version = kind.api_version.rpartition("/")
    return group, version, kind.plural


def watch_labelled_children(settings: kopf.OperatorSettings) -> None:
    """Have the API server send only the children's events: a labelSelector on the LIST and WATCH of
    each child kind (kopf's `settings.watching.label_selectors`; a handler's `labels` filter is applied
    in the operator, after the objects came). Only the child kinds, whose one handler (`_child`) wants
    the labelled ones: the ModelDeployments are watched whole; the rebalancer's experts ConfigMap
    (unlabelled) is read by the rebalancer itself, never through a kopf watch. The initial LIST of
    every kind comes in pages of WATCH_CHUNK_SIZE."""
    for kind in CHILD_KINDS:
        settings.watching.label_selectors[child_resource(kind)] = LABEL_DEPLOYMENT
    settings.watching.chunk_size = WATCH_CHUNK_SIZE


async def _handle(rt: OperatorState, namespace: str | None, name: str | None) -> None:
    if namespace is None or name is None:
        return
    try:
        await rt.reconcile_key((namespace, name), coalesce=False)
    except RetryableError as err:
        raise kopf.TemporaryError(str(err), delay=RETRY_DELAY_S) from err
    except RejectedError as err:  # e.g. forbidden by RBAC: retry slowly, an admin may fix it
        raise kopf.TemporaryError(str(err), delay=REJECTED_RETRY_DELAY_S) from err


def build_registry(rt: OperatorState) -> kopf.OperatorRegistry:
    """A registry with every handler bound to `rt` (no module-level state)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod: the service account; elsewhere: KUBECONFIG (kopf's own pure-Python loaders)."""
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
        return info or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # Events are posted per decision by the reconciler
        watch_labelled_children(settings)  # before kopf starts its watches (startup handlers run first)
        rt.resync = asyncio.create_task(rt.resync_forever())

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        if rt.resync is not None:
            rt.resync.cancel()

    @kopf.on.resume(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    @kopf.on.create(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    @kopf.on.update(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    async def _changed(namespace: str | None, name: str | None, **_: Any) -> None:
        await _handle(rt, namespace, name)

    @kopf.on.event(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    async def _desired(type: str, namespace: str | None, name: str, status: kopf.Status, **_: Any) -> None:
        """The autoscaler writes status.roles.*.desired; render it when it changed."""
        if type != "MODIFIED" or namespace is None:
            return
        key = (namespace, name)
        seen = rt.desired_seen.get(key)
        now = desired_of(parse_status(dict(status)))
        if seen is not None and now != seen:
            try:
                await rt.reconcile_key(key, coalesce=True)
            except (RetryableError, RejectedError) as err:
                log.warning("reconcile of %s/%s after a desired change: %s", namespace, name, err)

    for kind in CHILD_KINDS:
        group, version, plural = child_resource(kind)

        @kopf.on.event(
            group=group,
            version=version,
            plural=plural,
            labels={LABEL_DEPLOYMENT: kopf.PRESENT},
            registry=registry,
        )
        async def _child(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
            """A child changed (status, deleted, edited): reconcile its owner."""
            owner = labels.get(LABEL_DEPLOYMENT)
            if namespace is None or owner is None:
                return
            try:
                await rt.reconcile_key((namespace, owner), coalesce=True)
            except (RetryableError, RejectedError) as err:
                log.warning("reconcile of %s/%s after a child event: %s", namespace, owner, err)

    return registry
