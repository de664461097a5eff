"""The rebalancer's loop: every spec.experts.rebalance.intervalSeconds, for each expert-parallel role of
a torch-engine ModelDeployment with spec.experts, gather the expert load from every group leader, and
when a new placement predicts a large enough gain (choose.py), apply it.

Applying: the placement goes first into the role's ConfigMap (under the key of the groups' layout,
render/experts.placement_key: what a pod of that layout that starts later loads; render mounts it),
then to every group leader (POST /v1/experts/placement: the group loads the new expert copies in the
background and switches at one step), then into status.experts.<role> and an Event
(ExpertsRebalanced). A group that reports another generation than the ConfigMap's (it was loading,
or restarted before the kubelet refreshed its mounted file) is sent the ConfigMap's placement at the
next check, before anything new is chosen. Groups of different layouts (a rollout of a new
spec.experts.redundant, parallelism or model) are left alone until they all run one.

A group that gave a generation up (its load document's placement.error: a load that timed out, a
weight that failed to load, out of memory), or refused its POST for good (a 4xx answer: the document
does not fit the group), is not sent it again and again: each check that finds one counts a failed
try, says why in status.experts.<role>.message and a Warning Event (ExpertsPlacementFailed), and sends
it again; after MAX_PLACEMENT_TRIES the generation is given up (the loop's memory, `failed`): it is sent
no more, the ConfigMap goes back to the placement the groups that gave it up run, any group that runs
it is sent that placement back (the role runs one placement again, and is rebalanced on from it), and
the same placement is not chosen again, until another one is chosen or the spec changes
(metadata.generation). Where the groups sent back give that placement up too, the role is left split
rather than sent to the first placement again (each was given up by some group). That memory goes
with the operator's process; a new placement's number is above any the groups' errors name, so an
error about an earlier try is never read as one about it.

The ConfigMap also records the load each check saw (observed.json) and the last rebalance
(rebalance.json: it names its layout, and goes with that layout's placement), which
`kubectl moe experts` shows. It is owned by the ModelDeployment (deleted with
it) but carries no deployment label, so the reconciler, which prunes the labelled children it did not
render, leaves it alone.

vLLM balances its own experts (render passes spec.experts as its EPLB flags): nothing here for it.
Status is written by server-side apply with a field manager of its own, naming only status.experts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx2

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import API_VERSION, KIND
from kubemoe_operator.api.spec import ExpertsSpec, ModelDeploymentSpec
from kubemoe_operator.api.status import ExpertsStatus, now_utc
from kubemoe_operator.kube.client import Kube, RejectedError, RetryableError, event_body
from kubemoe_operator.kube.pods import Leader, running_leaders
from kubemoe_operator.rebalance.choose import choose
from kubemoe_operator.rebalance.configmap import (
    OBSERVED_KEY,
    REBALANCE_KEY,
    configmap,
    placement_of,
    record_of,
)
from kubemoe_operator.rebalance.failures import PlacementFailure, gave_up, named_generation
from kubemoe_operator.rebalance.group_api import fetch_load, send_placement
from kubemoe_operator.rebalance.loads import GroupLoad, LoadError, summed
from kubemoe_operator.render.experts import placement_key
from kubemoe_operator.render.names import Owner, experts_configmap_name

log = logging.getLogger("kubemoe.rebalance")

LeaderList = Callable[[str, str, str], Awaitable[list[Leader]]]

FIELD_MANAGER = "kubemoe-rebalancer"
COMPONENT = "kubemoe-rebalancer"
EVENT_REBALANCED = "ExpertsRebalanced"
EVENT_PLACEMENT_FAILED = "ExpertsPlacementFailed"
MAX_MESSAGE = 1024
"""status.experts.<role>.message's limit (api/status.py)."""


def expert_roles(spec: ModelDeploymentSpec) -> list[str]:
    """The roles the rebalancer places: torch engine, spec.experts, and expert parallelism (set, or
    left to the planner: then the pods say how many ranks they run)."""
    if spec.experts is None or spec.engine.kind != "torch":
        return []
    return [
        name
        for name, role in spec.roles.items()
        if role.parallelism is None or role.parallelism.expert_parallel
    ]


def placement_doc(
    generation: int, *, layers: tuple[int, ...], slots: tuple[tuple[int, ...], ...], ranks: int
) -> dict[str, Any]:
    """The document the pods load (docs/expert-load.md)."""
    return {
        "generation": generation,
        "ranks": ranks,
        "slotsPerRank": len(slots[0]) // ranks,
        "layers": [{"layer": layer, "slots": list(row)} for layer, row in zip(layers, slots, strict=True)],
    }


@dataclass
class RoleCheck:
    """One check of one role: what status.experts.<role> says afterwards."""

    status: ExpertsStatus
    applied: bool = False


@dataclass
class Rebalancer:
    kube: Kube
    client: httpx2.AsyncClient
    tick_s: float = 15.0
    """How often the loop looks for roles whose interval has passed."""
    interval_override_s: float | None = None
    """Every role's interval instead of spec.experts.rebalance.intervalSeconds (tests, demos)."""
    namespaces: tuple[str, ...] = ()
    leaders: LeaderList | None = None
    """A role's running group leaders (namespace, deployment, role); None: from the pod list."""
    clock: Callable[[], float] = time.monotonic
    last: dict[tuple[str, str], float] = field(default_factory=dict)
    """(ModelDeployment uid, role) -> when it was last checked (a role is first checked one interval
    after the operator starts leading, so a new leader does not rebalance at once)."""
    checks: dict[tuple[str, str], ExpertsStatus] = field(default_factory=dict)
    failed: dict[tuple[str, str], list[PlacementFailure]] = field(default_factory=dict)
    """(ModelDeployment uid, role) -> the placements its groups gave up since the last one applied, and
    how often, oldest first (for one layout and spec generation)."""

    async def run_forever(self) -> None:
        while True:
            try:
                await self.evaluate_all()
            except Exception:  # the loop outlives any one failure
                log.exception("rebalancer: evaluation failed")
            await asyncio.sleep(self.tick_s)

    async def evaluate_all(self) -> None:
        for namespace in self.namespaces or (None,):
            try:
                items = await self.kube.list_deployments(namespace=namespace)
            except (RetryableError, RejectedError) as err:
                log.warning("rebalancer: %s", err)
                continue
            for body in items:
                meta = body["metadata"]
                try:
                    await self.evaluate(body)
                except (RetryableError, RejectedError) as err:
                    log.warning("rebalancer: %s/%s: %s", meta["namespace"], meta["name"], err)
                except Exception:
                    log.exception("rebalancer: %s/%s: check failed", meta["namespace"], meta["name"])

    def _interval(self, experts: ExpertsSpec) -> float:
        if self.interval_override_s is not None:
            return self.interval_override_s
        return float(experts.rebalance.interval_seconds)

    async def evaluate(self, body: Mapping[str, Any], *, force: bool = False) -> dict[str, RoleCheck]:
        """Check every due role of one ModelDeployment (`force`: every role, due or not)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return {}
        try:
            manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": meta["name"]}}
            md = parse_manifest({**manifest, "spec": body.get("spec")})
        except ManifestError:
            return {}
        roles = expert_roles(md.spec)
        if not roles or md.spec.experts is None:
            return {}
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        now = self.clock()
        due = []
        for role in roles:
            key = (owner.uid, role)
            if key not in self.last and not force:
                self.last[key] = now
                continue
            if force or now - self.last[key] >= self._interval(md.spec.experts):
                self.last[key] = now
                due.append(role)
        out: dict[str, RoleCheck] = {}
        for role in due:
            out[role] = await self._check_role(
                owner,
                body,
                role,
                experts=md.spec.experts,
                source=md.spec.model.source,
                spec_generation=meta.get("generation"),
            )
            self.checks[(owner.uid, role)] = out[role].status
        if out:
            await self._write_status(owner, roles)
        return out

    async def _check_role(
        self,
        owner: Owner,
        body: Mapping[str, Any],
        role: str,
        *,
        experts: ExpertsSpec,
        source: str,
        spec_generation: int | None = None,
    ) -> RoleCheck:
        previous = self.checks.get((owner.uid, role)) or ExpertsStatus()
        history = self.failed.setdefault((owner.uid, role), [])
        if history and history[-1].spec_generation != spec_generation:
            history.clear()  # the spec changed: the placements may be tried again
        if self.leaders is not None:
            leaders = await self.leaders(owner.namespace, owner.name, role)
        else:
            leaders = await running_leaders(
                self.kube, namespace=owner.namespace, deployment=owner.name, role=role
            )
        if not leaders:
            return RoleCheck(status=previous.model_copy(update={"message": "no running group leader to ask"}))
        answers = await asyncio.gather(*(fetch_load(self.client, leader) for leader in leaders))
        loads = [
            (leader, load)
            for leader, load in zip(leaders, answers, strict=True)
            if isinstance(load, GroupLoad)
        ]
        errors = [str(a) for a in answers if isinstance(a, str)]
        if not loads:
            msg = f"no group leader reported its expert load: {errors[0] if errors else 'no answer'}"
            return RoleCheck(status=previous.model_copy(update={"message": msg[:1024]}))
        layouts = sorted({(load.ranks, load.slots_per_rank) for _, load in loads})
        if len(layouts) != 1:
            shown = ", ".join(f"{r} ranks x {s} slots" for r, s in layouts)
            msg = f"the groups run different layouts ({shown}): waiting for the rollout"
            return RoleCheck(status=previous.model_copy(update={"message": msg}))
        ((ranks, slots_per_rank),) = layouts
        key = placement_key(ranks=ranks, slots_per_rank=slots_per_rank, source=source)
        name = experts_configmap_name(owner.name, role)
        cm = await self.kube.get_child(kind="ConfigMap", name=name, namespace=owner.namespace)
        if history and history[-1].key != key:  # another layout now: its placements are gone
            history.clear()
        target = placement_of(cm, key)
        failure = None  # the failure of the placement the role runs or is brought to
        record: dict[str, Any] | None = None  # rebalance.json marked not applied, when it goes back (below)
        if target is not None:
            failure = next((f for f in history if f.matches(target)), None)
            behind = [
                (leader, load)
                for leader, load in loads
                if target["generation"] not in (load.generation, load.pending_generation)
            ]
            if not behind and failure is not None:
                history.remove(failure)  # applied everywhere after all
                failure = None
            if behind:
                if failure is None:
                    failure = PlacementFailure(
                        generation=target["generation"],
                        layers=target.get("layers"),
                        key=key,
                        spec_generation=spec_generation,
                    )
                failed = [(leader, load) for leader, load in behind if gave_up(load, target["generation"])]
                if failed and not failure.given_up:
                    error = f"{failed[0][0].name}: {failed[0][1].error}"
                    await self._count_failure(body, role, history, failure, error, groups=len(failed))
                if not failure.given_up:
                    took = await asyncio.gather(
                        *(send_placement(self.client, leader, target) for leader, _ in behind)
                    )
                    refused = [
                        f"{leader.name} {said}"
                        for (leader, _), said in zip(behind, took, strict=True)
                        if isinstance(said, str)
                    ]
                    if refused and not failed:  # one try a check, whichever way it failed
                        await self._count_failure(
                            body, role, history, failure, refused[0], groups=len(refused)
                        )
                    msg = f"bringing {len(behind)} group(s) to placement generation {target['generation']}"
                    if failure.tries:
                        msg += f"; {failure.summary()}"
                    return RoleCheck(status=previous.model_copy(update={"message": msg[:MAX_MESSAGE]}))
                record = record_of(cm)  # its record says the move was not made
                if record is not None and record.get("generation") == failure.generation:
                    record["notApplied"] = failure.error
                else:
                    record = None
                if len(behind) < len(loads):
                    return await self._roll_back(
                        owner,
                        role,
                        loads,
                        behind,
                        failure=failure,
                        history=history,
                        previous=previous,
                        cm=cm,
                        key=key,
                        record=record,
                    )
                # every group still runs what it ran: the ConfigMap goes back to that (a pod that
                # starts later loads what the others run)
                target = None
        first = loads[0][1]
        if any(load.pending_generation is not None for _, load in loads):
            return RoleCheck(
                status=previous.model_copy(update={"message": "a group is still loading a placement"})
            )
        if len({(load.generation, load.slots) for _, load in loads}) != 1:
            msg = "the groups run different placements; waiting for them to agree"
            return RoleCheck(status=previous.model_copy(update={"message": msg}))
        if ranks == 1:
            return RoleCheck(status=previous.model_copy(update={"message": "one rank: nothing to place"}))
        if first.redundant != experts.redundant:
            msg = (
                f"the pods run {first.redundant} redundant expert slots, spec.experts.redundant says "
                f"{experts.redundant}: waiting for the rollout"
            )
            return RoleCheck(status=previous.model_copy(update={"message": msg}))
        try:
            tokens = summed([load for _, load in loads])
        except LoadError as err:
            return RoleCheck(status=previous.model_copy(update={"message": str(err)}))
        choice = choose(
            tokens,
            first.slots,
            ranks=ranks,
            redundant=experts.redundant,
            min_improvement=experts.rebalance.min_improvement,
        )
        stamp = now_utc()
        observed = {
            "time": _rfc3339(stamp),
            "generation": first.generation,
            "layers": list(first.layers),
            "tokens": [list(t) for t in tokens],
            "imbalance": [round(x, 4) for x in choice.layer_before],
        }
        data = {OBSERVED_KEY: observed}
        if record is not None:
            data[REBALANCE_KEY] = record
        current = placement_doc(first.generation, layers=first.layers, slots=first.slots, ranks=ranks)
        data[key] = target if target is not None else current
        given_up = [f for f in history if f.given_up]
        reason = f"{choice.reason}; {given_up[-1].summary()}" if given_up else choice.reason
        status = previous.model_copy(
            update={
                "generation": first.generation,
                "imbalance": round(choice.before, 4),
                "message": reason[:MAX_MESSAGE],
            }
        )
        # a number no group has given up (here or before the operator restarted): the group's error
        # then names the generation it is about
        given = [*(f.generation for f in history), *(named_generation(load) for _, load in loads)]
        generation = max(first.generation, *given) + 1
        placement = placement_doc(generation, layers=first.layers, slots=choice.slots, ranks=ranks)
        chosen_before = any(f.layers == placement["layers"] for f in given_up)
        if not choice.apply or chosen_before:  # a placement given up is not chosen again
            await self._apply_configmap(
                configmap(owner, role, data, keep=cm, key=key, width=ranks * slots_per_rank)
            )
            return RoleCheck(status=status)
        history.clear()  # another placement: a fresh start
        data[key] = placement
        data[REBALANCE_KEY] = {
            "generation": generation,
            "ranks": ranks,
            "slotsPerRank": slots_per_rank,
            "placementKey": key,
            "time": _rfc3339(stamp),
            "windowSeconds": first.window_seconds,
            "layers": list(first.layers),
            "tokens": [list(t) for t in tokens],
            "previousSlots": [list(s) for s in first.slots],
            "slots": [list(s) for s in choice.slots],
            "imbalanceBefore": [round(x, 4) for x in choice.layer_before],
            "imbalancePredicted": [round(x, 4) for x in choice.layer_predicted],
        }
        await self._apply_configmap(
            configmap(owner, role, data, keep=cm, key=key, width=ranks * slots_per_rank)
        )
        posted = await asyncio.gather(
            *(send_placement(self.client, leader, placement) for leader in (lead for lead, _ in loads))
        )
        message = f"{role}: {choice.reason} (generation {generation})"
        late = sum(p is not True for p in posted)
        if late:
            message += f"; {late} group(s) will be sent it again at the next check"
        log.info("rebalancer: %s/%s %s", owner.namespace, owner.name, message)
        await self._event(body, EVENT_REBALANCED, message, warning=False, at=stamp)
        refused = [
            f"{leader.name} {said}"
            for (leader, _), said in zip(loads, posted, strict=True)
            if isinstance(said, str)
        ]
        if refused:  # the first try of this placement failed
            failure = PlacementFailure(
                generation=generation, layers=placement["layers"], key=key, spec_generation=spec_generation
            )
            await self._count_failure(body, role, history, failure, refused[0], groups=len(refused))
        said = choice.reason if not refused else f"{choice.reason}; {history[-1].summary()}"
        status = status.model_copy(
            update={
                "generation": generation,
                "predicted_imbalance": round(choice.predicted, 4),
                "last_rebalance_time": stamp,
                "message": said[:MAX_MESSAGE],
            }
        )
        return RoleCheck(status=status, applied=True)

    async def _roll_back(
        self,
        owner: Owner,
        role: str,
        loads: list[tuple[Leader, GroupLoad]],
        behind: list[tuple[Leader, GroupLoad]],
        *,
        failure: PlacementFailure,
        history: list[PlacementFailure],
        previous: ExpertsStatus,
        cm: Mapping[str, Any] | None,
        key: str,
        record: dict[str, Any] | None,
    ) -> RoleCheck:
        """A placement given up that some groups run: they go back to the placement the groups that gave
        it up run (its generation and slots), in the ConfigMap too, so the role runs one placement again
        and is rebalanced on from it (never to the one given up). Left as it is while a group loads,
        while those groups run different placements, or where theirs was given up too (`history`: the
        groups sent back to it gave it up; sending the others to it again would swing the role between
        two placements that fail, each reading experts every try)."""
        ran = len(loads) - len(behind)
        rest = {(load.generation, load.slots) for _, load in behind}
        if len(rest) != 1 or any(load.pending_generation is not None for _, load in loads):
            msg = f"{failure.summary()}; {ran} group(s) run it, {len(behind)} do not"
            return RoleCheck(status=previous.model_copy(update={"message": msg[:MAX_MESSAGE]}))
        back = behind[0][1]
        ranks = back.ranks
        doc = placement_doc(back.generation, layers=back.layers, slots=back.slots, ranks=ranks)
        if any(f.given_up and f.matches(doc) for f in history):
            msg = (
                f"{failure.summary()}; {ran} group(s) run it, {len(behind)} run generation "
                f"{back.generation}, which was given up as well: left so until another placement is chosen "
                "or the spec changes"
            )
            return RoleCheck(status=previous.model_copy(update={"message": msg[:MAX_MESSAGE]}))
        data: dict[str, Any] = {key: doc} if record is None else {key: doc, REBALANCE_KEY: record}
        await self._apply_configmap(
            configmap(owner, role, data, keep=cm, key=key, width=ranks * back.slots_per_rank)
        )
        runs_it = [
            leader for leader, load in loads if (load.generation, load.slots) != (back.generation, back.slots)
        ]
        posted = await asyncio.gather(*(send_placement(self.client, leader, doc) for leader in runs_it))
        late = sum(p is not True for p in posted)
        msg = (
            f"{failure.summary()}; the {ran} group(s) that ran it are sent back to the placement the others "
            f"run (generation {back.generation})"
        )
        if late:
            msg += f"; {late} did not take it yet"
        return RoleCheck(status=previous.model_copy(update={"message": msg[:MAX_MESSAGE]}))

    async def _event(
        self, body: Mapping[str, Any], reason: str, message: str, *, warning: bool, at: datetime
    ) -> None:
        """An Event about the ModelDeployment `body`, from the rebalancer."""
        await self.kube.post_event(
            event_body(
                involved={**body, "apiVersion": API_VERSION, "kind": KIND},
                reason=reason,
                message=message,
                warning=warning,
                component=COMPONENT,
                now=_rfc3339(at),
            )
        )

    async def _count_failure(
        self,
        body: Mapping[str, Any],
        role: str,
        history: list[PlacementFailure],
        failure: PlacementFailure,
        error: str,
        *,
        groups: int,
    ) -> None:
        """One more failed try of `failure` (kept in the role's `history`), and a Warning Event: `groups`
        group(s) gave the placement up, `error` the first one's words."""
        failure.tries += 1
        failure.error = error
        if not any(f is failure for f in history):
            history.append(failure)
        meta = body["metadata"]
        message = f"{role}: {groups} group(s) did not apply it; {failure.summary()}"
        log.warning("rebalancer: %s/%s %s", meta["namespace"], meta["name"], message)
        await self._event(body, EVENT_PLACEMENT_FAILED, message, warning=True, at=now_utc())

    async def _apply_configmap(self, body: dict[str, Any]) -> None:
        await self.kube.apply(body, field_manager=FIELD_MANAGER)

    async def _write_status(self, owner: Owner, roles: list[str]) -> None:
        experts = {
            role: self.checks[(owner.uid, role)].model_dump(by_alias=True, mode="json", exclude_none=True)
            for role in roles
            if (owner.uid, role) in self.checks
        }
        await self.kube.apply_status(
            name=owner.name,
            namespace=owner.namespace,
            status={"experts": experts},
            field_manager=FIELD_MANAGER,
        )


def _rfc3339(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
