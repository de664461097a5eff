"""The autoscaler's loop: every interval, for each ModelDeployment and each role with `autoscaling`,
read the role's samples, `decide`, and record the decision in status.roles.<role>.desired (the
reconciler renders it, clamped to minReplicas..maxReplicas; spec is never written).

- Prefill and decode are evaluated independently, each with its own history of recommendations,
  kept in memory per ModelDeployment uid and role with when its unbroken run of readings began and
  when it last changed the role: a new leader, or any role after a metrics outage, starts with none
  and changes nothing until its readings cover a full window (decide.py); each change starts a
  cooldown, and is recorded in status.roles.<role>.lastScaleTime with the desired, so that a new
  leader's cooldown runs from it. The recommendation counts the groups that are ready
  (status.roles.<role>.ready, from the reconciler), so groups still loading are capacity on the way,
  not a reason to add more; the signals are read from the ready groups only (ready.py).
- Deployments are evaluated a few at a time (CONCURRENT_DEPLOYMENTS), each re-read just before its
  evaluation once the list is older than REREAD_AFTER_S (so its apply carries a fresh
  resourceVersion), its samples read within the interval (else its metrics are unavailable this
  time) and its whole evaluation within two: a slow pod or Prometheus holds up its own deployment,
  not every other.
- Before a scale-down is written, each one-pod group of the role gets its load as its deletion cost,
  so that the Deployment removes the least loaded (removal.py); the group removed then drains.
- desired is written only when a decision differs from the replicas the role runs now (so a
  role whose load never moves keeps following spec.replicas), and each such write is an Event
  (reason Scaled, the decision's reason as the message).
- The condition MetricsAvailable says whether the samples could be read (written when it
  changes; its messages hold no sample values, so a steady state writes nothing); when they cannot
  (Prometheus unreachable, no pod answers, no series), nothing is scaled. With autoscaling
  removed from every role, an empty apply removes the condition and every desired (done once:
  only while managedFields says the autoscaler still owns status fields).
- Status is written by server-side apply with a field manager of its own, naming only the fields
  the autoscaler owns (every autoscaled role's desired, decidedBy, lastScaleTime and its condition);
  the reconciler's apply names only its own (status.py), so neither can write the other's fields
  back from a stale read.
  Each apply carries the resourceVersion the decision was made on: a spec or status that changed
  meanwhile makes it a no-op (409), and the next evaluation decides again on what is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from prometheus_client import Counter, Gauge

from kubemoe_operator.api.desired import effective_spec, parse_status
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import API_VERSION, KIND
from kubemoe_operator.api.spec import Autoscaling, MetricType, ModelDeploymentSpec, RoleName
from kubemoe_operator.api.status import Condition, ModelDeploymentStatus, now_utc
from kubemoe_operator.autoscale.decide import Decision, RoleMemory, couple
from kubemoe_operator.autoscale.prometheus import MetricsUnavailable
from kubemoe_operator.autoscale.ready import ready_leaders
from kubemoe_operator.autoscale.removal import LeastLoaded
from kubemoe_operator.autoscale.scrape import Targets
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.client import Kube, RejectedError, RetryableError, event_body
from kubemoe_operator.run.metrics import OperatorMetrics

log = logging.getLogger("kubemoe.autoscale")

FIELD_MANAGER = "kubemoe-autoscaler"
COMPONENT = "kubemoe-autoscaler"
CONDITION = "MetricsAvailable"
REASON_READ = "MetricsRead"
REASON_UNAVAILABLE = "MetricsUnavailable"
EVENT_SCALED = "Scaled"
CONCURRENT_DEPLOYMENTS = 8
"""ModelDeployments evaluated at once."""
REREAD_AFTER_S = 1.0
"""A deployment whose list entry is older than this is read again before its evaluation."""


class Source(Protocol):
    """Where samples come from: PrometheusSource or ScrapeSource."""

    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]: ...


@runtime_checkable
class KeepsHistory(Protocol):
    """A source that keeps something per ModelDeployment between samples (ScrapeSource's histograms)."""

    def forget(self, *, keep: Collection[tuple[str, str]]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class RoleOutcome:
    """One evaluation of one role."""

    role: str
    current: int
    """The replicas the role runs now (spec.replicas, or the desired already rendered)."""
    previous: int | None
    """status.roles.<role>.desired before this evaluation."""
    previous_by: str | None = None
    """status.roles.<role>.decidedBy before this evaluation."""
    previous_scale_time: datetime | None = None
    """status.roles.<role>.lastScaleTime before this evaluation."""
    decision: Decision | None = None
    error: str | None = None
    """Why the source could not be read; then there is no decision."""

    @property
    def available(self) -> bool:
        return self.error is None and self.decision is not None and self.decision.metrics_available

    @property
    def new_desired(self) -> int | None:
        """The desired to write, or None when nothing changes."""
        d = self.decision
        if d is None or not d.metrics_available or d.desired in (self.current, self.previous):
            return None
        return d.desired

    @property
    def stale_desired(self) -> bool:
        """Whether the stored desired is one minReplicas/maxReplicas clamp away from what runs, and
        the decision is to stay: then desired is written down to what runs (no scaling, no event).
        Left as it was, a later change of the bounds would jump the role straight back to it,
        past the windows, the cooldown and maxStep."""
        d = self.decision
        return (
            d is not None
            and d.metrics_available
            and d.desired == self.current
            and self.previous is not None
            and self.previous != self.current
        )


def metrics_condition(outcomes: Sequence[RoleOutcome], *, source: str) -> tuple[bool, str, str]:
    """(available, reason, message) for the MetricsAvailable condition."""
    failed = [o for o in outcomes if not o.available]
    if not failed:
        roles = ", ".join(o.role for o in outcomes)
        return True, REASON_READ, f"autoscaling {roles} on metrics from {source}"
    why = "; ".join(
        f"{o.role}: {o.error if o.error is not None else o.decision.reason if o.decision else '?'}"
        for o in failed
    )
    return False, REASON_UNAVAILABLE, f"not scaling {', '.join(o.role for o in failed)}: {why}"


def status_apply(
    *,
    old: ModelDeploymentStatus | None,
    outcomes: Sequence[RoleOutcome],
    source: str,
    generation: int | None,
    now: datetime,
) -> dict[str, Any] | None:
    """The status fields the autoscaler owns, for server-side apply; None when nothing changed.

    Every autoscaled role's desired, decidedBy and lastScaleTime are named (the new ones, else those
    already there): a field an apply leaves out is removed from what this manager owns, and would
    be deleted. A new desired carries lastScaleTime `now`; one written down to what runs
    (stale_desired) is no scaling and keeps the time it had.
    """
    available, reason, message = metrics_condition(outcomes, source=source)
    status: Literal["True", "False"] = "True" if available else "False"
    before: Condition | None = next((c for c in old.conditions if c.type == CONDITION), None) if old else None
    condition_changed = before is None or (before.status, before.reason, before.message) != (
        status,
        reason,
        message,
    )
    changed = [o for o in outcomes if o.new_desired is not None or o.stale_desired]
    if not changed and not condition_changed:
        return None
    if before is not None and not condition_changed:
        cond = before
    else:
        since = before.last_transition_time if before is not None and before.status == status else now
        cond = Condition(
            type=CONDITION,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=generation,
        )
    roles: dict[str, Any] = {}
    for o in outcomes:
        desired, by, at = o.previous, o.previous_by, o.previous_scale_time
        if o.new_desired is not None and o.decision is not None:
            desired, by, at = o.new_desired, o.decision.signal, now
        elif o.stale_desired:
            desired = o.current
        if desired is not None:
            roles[o.role] = (
                {"desired": desired}
                | ({"decidedBy": by} if by else {})
                | ({"lastScaleTime": _timestamp(at)} if at is not None else {})
            )
    body: dict[str, Any] = {"conditions": [cond.model_dump(by_alias=True, mode="json", exclude_none=True)]}
    if roles:
        body["roles"] = roles
    return body


def owns_status(body: Mapping[str, Any], manager: str) -> bool:
    """Whether `manager` owns fields of `body`'s status (by server-side apply), per managedFields."""
    entries = (body.get("metadata") or {}).get("managedFields") or []
    return any(
        e.get("manager") == manager
        and e.get("operation") == "Apply"
        and e.get("subresource") == "status"
        and ((e.get("fieldsV1") or {}).get("f:status") or {})  # an entry can outlive its fields
        for e in entries
    )


def _timestamp(at: datetime) -> str:
    """metav1.Time: RFC 3339 in UTC, whole seconds."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_targets(kube: Kube) -> Targets:
    """ScrapeSource targets: /metrics of the role's ready API pods (group leaders), by pod IP."""
    leaders = ready_leaders(kube)

    async def targets(sel: RoleSelector) -> list[str]:
        return [leader.url for leader in await leaders(sel)]

    return targets


@dataclass
class Autoscaler:
    kube: Kube
    source: Source
    source_name: str
    """Where the metrics come from, in words (for the condition's message)."""
    interval_s: float
    namespaces: tuple[str, ...] = ()
    """Empty: every namespace."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = now_utc
    """The time status records (lastScaleTime, the condition's); `clock` measures the windows."""
    removal: LeastLoaded | None = None
    """Marks the least loaded group before a scale-down (removal.py); None: leave the choice to the
    workload controller."""
    memory: dict[tuple[str, str], RoleMemory] = field(default_factory=dict)
    """(ModelDeployment uid, role) -> what this autoscaler remembers of it (decide.py)."""
    series: dict[str, set[tuple[Gauge | Counter, tuple[str, ...]]]] = field(default_factory=dict)
    """ModelDeployment uid -> its series in the operator's metrics (metric, label values), removed with it."""

    async def run_forever(self) -> None:
        """Evaluate every interval (a fixed cadence: a slow evaluation does not shift the next)."""
        next_at = self.clock()
        while True:
            try:
                await self.evaluate_all()
            except Exception:  # the loop outlives any one failure; the next interval tries again
                log.exception("autoscaler: evaluation failed")
            next_at += self.interval_s
            delay = next_at - self.clock()
            if delay < 0:  # fell behind: start again from now rather than burst
                next_at, delay = self.clock(), 0.0
            await asyncio.sleep(delay)

    async def evaluate_all(self) -> None:
        bodies: list[Mapping[str, Any]] = []
        complete = True
        for namespace in self.namespaces or (None,):
            try:
                bodies += await self.kube.list_deployments(namespace=namespace)
            except (RetryableError, RejectedError) as err:
                log.warning("autoscaler: %s", err)
                complete = False  # a failed list says nothing about what was deleted
        listed_at = self.clock()
        slots = asyncio.Semaphore(CONCURRENT_DEPLOYMENTS)

        async def one(body: Mapping[str, Any]) -> None:
            async with slots:
                await self._evaluate_in_time(body, listed_at=listed_at)

        await asyncio.gather(*(one(body) for body in bodies))
        if complete:
            metas = [body["metadata"] for body in bodies]
            self._forget(keep={m["uid"] for m in metas}, names={(m["namespace"], m["name"]) for m in metas})

    async def _evaluate_in_time(self, body: Mapping[str, Any], *, listed_at: float) -> None:
        """One deployment's evaluation, on a fresh read of it and within two intervals; its failures
        are logged, never raised (one deployment's failure must not stop the others' scaling)."""
        meta = body["metadata"]
        where = f"{meta['namespace']}/{meta['name']}"
        deadline = asyncio.timeout(2 * self.interval_s)
        try:
            async with deadline:
                if self.clock() - listed_at > REREAD_AFTER_S:
                    fresh = await self.kube.get_deployment(name=meta["name"], namespace=meta["namespace"])
                    if fresh is None or fresh["metadata"].get("uid") != meta["uid"]:
                        return  # deleted (or replaced) since the list: the next pass sees what is there
                    body = fresh
                await self.evaluate(body)
        except (RetryableError, RejectedError) as err:
            log.warning("autoscaler: %s: %s", where, err)
        except TimeoutError:
            if not deadline.expired():
                log.exception("autoscaler: %s: evaluation failed", where)
            else:
                log.warning(
                    "autoscaler: %s: evaluation took over %g s; cut short", where, 2 * self.interval_s
                )
        except Exception:
            log.exception("autoscaler: %s: evaluation failed", where)

    def _forget(self, *, keep: set[str], names: set[tuple[str, str]] | None = None) -> None:
        """Drop the history and the per-role series of ModelDeployments that are gone (`keep`: the uids
        there are; `names`: their namespaces and names, for what the source keeps)."""
        for uid in [u for u in self.series if u not in keep]:
            for gauge, labels in self.series.pop(uid):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        for key in [k for k in self.memory if k[0] not in keep]:
            del self.memory[key]
        if names is not None and isinstance(self.source, KeepsHistory):
            self.source.forget(keep=names)

    async def evaluate(self, body: Mapping[str, Any]) -> list[RoleOutcome]:
        """One evaluation of every autoscaled role of one ModelDeployment."""
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        if meta.get("deletionTimestamp"):
            return []
        try:
            manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}}
            md = parse_manifest({**manifest, "spec": body.get("spec")})
        except ManifestError:
            return []  # the reconciler reports a spec that does not parse
        old = parse_status(body.get("status"))
        policies = {  # no metrics nor perDecode, or mode external: nothing for the operator to decide
            role: spec.autoscaling
            for role, spec in md.spec.roles.items()
            if spec.autoscaling is not None and spec.autoscaling.operator_scaled
        }
        if not policies:
            if owns_status(body, FIELD_MANAGER):
                # Autoscaling was turned off: an empty apply drops every field this manager owns
                # (the condition, each desired), so spec.replicas rules again.
                await self.kube.apply_status(
                    name=name,
                    namespace=namespace,
                    status={},
                    field_manager=FIELD_MANAGER,
                    resource_version=meta.get("resourceVersion"),
                )
            return []
        current = groups_now(md.spec, old)
        seen = old.roles if old is not None else {}
        outcomes = await asyncio.gather(
            *(
                self._evaluate_role(
                    sel=RoleSelector(namespace=namespace, deployment=name, role=role),
                    uid=uid,
                    policy=policy,
                    current=current[role],
                    previous=seen[role].desired if role in seen else None,
                    previous_by=seen[role].decided_by if role in seen else None,
                    previous_scale_time=seen[role].last_scale_time if role in seen else None,
                    ready=seen[role].ready if role in seen else None,
                )
                for role, policy in policies.items()
            )
        )
        outcomes = coupled(outcomes, policies=policies, current=current)
        self._record_decisions(namespace, name, uid, outcomes)
        patch = status_apply(
            old=old,
            outcomes=outcomes,
            source=self.source_name,
            generation=meta.get("generation"),
            now=self.wall(),
        )
        if patch is not None:
            for o in outcomes:
                if self.removal is not None and o.new_desired is not None and o.new_desired < o.current:
                    await self.removal.mark(RoleSelector(namespace=namespace, deployment=name, role=o.role))
            written = await self.kube.apply_status(
                name=name,
                namespace=namespace,
                status=patch,
                field_manager=FIELD_MANAGER,
                resource_version=meta.get("resourceVersion"),
            )
            if not written:  # changed since it was read: decide again next time on what is there
                log.info("autoscaler: %s/%s changed while it was evaluated; deciding again", namespace, name)
                return list(outcomes)
            for o in outcomes:
                if o.new_desired is not None:
                    self.memory.setdefault((uid, o.role), RoleMemory()).changed(self.clock())
            (cond,) = patch["conditions"]
            if cond["status"] == "False":
                log.warning("autoscaler: %s/%s: %s", namespace, name, cond["message"])
            await self._announce({**body, "apiVersion": API_VERSION, "kind": KIND}, outcomes)
        return list(outcomes)

    def _record_decisions(self, namespace: str, name: str, uid: str, outcomes: Sequence[RoleOutcome]) -> None:
        """Each role's decision in the operator's metrics: after the coupling, so prefill's series show
        what it will run (perDecode's bound), not its own metrics' wish."""
        series = self.series.setdefault(uid, set())
        for o in outcomes:
            if o.decision is None or not o.decision.metrics_available:
                continue
            labels = (namespace, name, o.role)
            desired = o.decision.desired
            direction = "up" if desired > o.current else "down" if desired < o.current else "hold"
            self.metrics.decisions.labels(*labels, direction).inc()
            self.metrics.desired.labels(*labels).set(desired)
            series.update({(self.metrics.decisions, (*labels, direction)), (self.metrics.desired, labels)})

    async def _evaluate_role(
        self,
        *,
        sel: RoleSelector,
        uid: str,
        policy: Autoscaling,
        current: int,
        previous: int | None,
        ready: int | None,
        previous_by: str | None = None,
        previous_scale_time: datetime | None = None,
    ) -> RoleOutcome:
        labels = (sel.namespace, sel.deployment, sel.role)
        memory = self.memory.setdefault((uid, sel.role), RoleMemory())
        if previous_scale_time is not None:  # a new leader's cooldown runs from the last change
            ago = max(0.0, (self.wall() - previous_scale_time).total_seconds())
            memory.seed(self.clock() - ago)
        outcome_of = functools.partial(
            RoleOutcome,
            role=sel.role,
            current=current,
            previous=previous,
            previous_by=previous_by,
            previous_scale_time=previous_scale_time,
        )
        try:  # a role that only follows decode (perDecode, no metrics) has nothing to read
            async with asyncio.timeout(self.interval_s):  # this interval's samples, or none
                samples = (
                    await self.source.sample(sel, [m.type for m in policy.metrics]) if policy.metrics else {}
                )
        except TimeoutError:
            self._evaluated(uid, labels, "unavailable")
            memory.outage()
            return outcome_of(error=f"metrics not read within the {self.interval_s:g} s interval")
        except Exception as err:  # MetricsUnavailable, or a source's bug: either way, no reading
            if not isinstance(err, MetricsUnavailable):
                log.exception("autoscaler: %s/%s %s: reading metrics failed", *labels)
            self._evaluated(uid, labels, "unavailable")
            log.debug("autoscaler: %s/%s %s: %s", *labels, err)
            error = (
                str(err) if isinstance(err, MetricsUnavailable) else f"reading metrics failed: {err!r:.200}"
            )
            memory.outage()
            return outcome_of(error=error)
        series = self.series.setdefault(uid, set())
        for metric, value in samples.items():
            self.metrics.metric_value.labels(*labels, metric).set(math.nan if value is None else value)
            series.add((self.metrics.metric_value, (*labels, metric)))
        decision = memory.decide(
            current=current,
            ready=ready,
            samples=samples,
            policy=policy,
            now=self.clock(),
            max_gap=2 * self.interval_s,
        )
        outcome = "decided" if decision.metrics_available else "unavailable"
        self._evaluated(uid, labels, outcome)
        log.debug("autoscaler: %s/%s %s: %s", *labels, decision.reason)
        return outcome_of(decision=decision)

    def _evaluated(self, uid: str, labels: tuple[str, str, str], outcome: str) -> None:
        self.metrics.evaluations.labels(*labels, outcome).inc()
        self.series.setdefault(uid, set()).add((self.metrics.evaluations, (*labels, outcome)))

    async def _announce(self, body: Mapping[str, Any], outcomes: Sequence[RoleOutcome]) -> None:
        stamp = now_utc().strftime("%Y-%m-%dT%H:%M:%SZ")
        for o in outcomes:
            if o.new_desired is None or o.decision is None:
                continue
            message = f"{o.role}: {o.decision.reason}"
            log.info("autoscaler: %s/%s %s", body["metadata"]["namespace"], body["metadata"]["name"], message)
            await self.kube.post_event(
                event_body(
                    involved=body,
                    reason=EVENT_SCALED,
                    message=message,
                    warning=False,
                    component=COMPONENT,
                    now=stamp,
                )
            )


def coupled(
    outcomes: Sequence[RoleOutcome], *, policies: Mapping[RoleName, Autoscaling], current: Mapping[str, int]
) -> list[RoleOutcome]:
    """Prefill's outcome kept within its perDecode bounds of the groups decode will run: decode's new
    decision when it has one, else the groups it runs now. Prefill's own decision must exist and
    rest on readings (a metrics outage changes nothing, coupled or not)."""
    out = list(outcomes)
    ratio = policies["prefill"].per_decode if "prefill" in policies else None
    if ratio is None or "decode" not in current:
        return out
    decode = next((o for o in out if o.role == "decode"), None)
    decode_groups = (
        decode.decision.desired
        if decode is not None and decode.available and decode.decision is not None
        else current["decode"]
    )
    for i, o in enumerate(out):
        if o.role == "prefill" and o.available and o.decision is not None:
            decision = couple(
                o.decision, current=o.current, decode=decode_groups, ratio=ratio, policy=policies["prefill"]
            )
            out[i] = replace(o, decision=decision)
    return out


def groups_now(spec: ModelDeploymentSpec, status: ModelDeploymentStatus | None) -> dict[str, int]:
    """Each role's groups in effect: the effective spec's replicas, except for a role an HPA or KEDA
    scales (mode external), whose spec.replicas is only its first count: the reconciler's
    status.roles.<role>.replicas has the groups its workload runs now (perDecode's reference), once
    it has any (0 while the workload is being created)."""
    current: dict[str, int] = {role: s.replicas for role, s in effective_spec(spec, status).roles.items()}
    seen = status.roles if status is not None else {}
    for role, s in spec.roles.items():
        if s.autoscaling is not None and s.autoscaling.mode == "external" and role in seen:
            current[role] = seen[role].replicas or current[role]
    return current
