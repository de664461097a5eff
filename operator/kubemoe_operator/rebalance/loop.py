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

The ConfigMap also records the load each check saw (observed.json) and the last rebalance
(rebalance.json), which `kubectl moe experts` shows. It is owned by the ModelDeployment (deleted with
it) but carries no deployment label, so the reconciler, which prunes the labelled children it did not
render, leaves it alone.

vLLM balances its own experts (render passes spec.experts as its EPLB flags): nothing here for it.
Status is written by server-side apply with a field manager of its own, naming only status.experts.
"""

from __future__ import annotations

import asyncio
import json
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
from kubemoe_operator.rebalance.loads import GroupLoad, LoadError, parse_group_load, summed
from kubemoe_operator.render.experts import PLACEMENT_FILE, PLACEMENT_KEY_PREFIX, placement_key
from kubemoe_operator.render.names import Owner, experts_configmap_name

log = logging.getLogger("kubemoe.rebalance")

LeaderList = Callable[[str, str, str], Awaitable[list[Leader]]]

FIELD_MANAGER = "kubemoe-rebalancer"
COMPONENT = "kubemoe-rebalancer"
EVENT_REBALANCED = "ExpertsRebalanced"
REBALANCE_KEY, OBSERVED_KEY = "rebalance.json", "observed.json"
MAX_BODY = 8 << 20
"""A load document is ~11 bytes per expert and layer (DeepSeek-V3: ~0.3 MiB); a longer one is not read."""


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
                owner, body, role, experts=md.spec.experts, source=md.spec.model.source
            )
            self.checks[(owner.uid, role)] = out[role].status
        if out:
            await self._write_status(owner, roles)
        return out

    async def _check_role(
        self, owner: Owner, body: Mapping[str, Any], role: str, *, experts: ExpertsSpec, source: str
    ) -> RoleCheck:
        previous = self.checks.get((owner.uid, role)) or ExpertsStatus()
        if self.leaders is not None:
            leaders = await self.leaders(owner.namespace, owner.name, role)
        else:
            leaders = await running_leaders(
                self.kube, namespace=owner.namespace, deployment=owner.name, role=role
            )
        if not leaders:
            return RoleCheck(status=previous.model_copy(update={"message": "no running group leader to ask"}))
        answers = await asyncio.gather(*(self._load(leader) for leader in leaders))
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
        target = _placement_of(cm, key)
        if target is not None:
            behind = [
                leader
                for leader, load in loads
                if target["generation"] not in (load.generation, load.pending_generation)
            ]
            if behind:
                await asyncio.gather(*(self._post(leader, target) for leader in behind))
                msg = f"bringing {len(behind)} group(s) to placement generation {target['generation']}"
                return RoleCheck(status=previous.model_copy(update={"message": msg}))
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
        current = placement_doc(first.generation, layers=first.layers, slots=first.slots, ranks=ranks)
        data[key] = target if target is not None else current
        status = previous.model_copy(
            update={
                "generation": first.generation,
                "imbalance": round(choice.before, 4),
                "message": choice.reason,
            }
        )
        if not choice.apply:
            await self._apply_configmap(owner, role, data, keep=cm)
            return RoleCheck(status=status)
        generation = first.generation + 1
        placement = placement_doc(generation, layers=first.layers, slots=choice.slots, ranks=ranks)
        data[key] = placement
        data[REBALANCE_KEY] = {
            "generation": generation,
            "time": _rfc3339(stamp),
            "windowSeconds": first.window_seconds,
            "layers": list(first.layers),
            "tokens": [list(t) for t in tokens],
            "previousSlots": [list(s) for s in first.slots],
            "slots": [list(s) for s in choice.slots],
            "imbalanceBefore": [round(x, 4) for x in choice.layer_before],
            "imbalancePredicted": [round(x, 4) for x in choice.layer_predicted],
        }
        await self._apply_configmap(owner, role, data, keep=cm)
        posted = await asyncio.gather(
            *(self._post(leader, placement) for leader in (lead for lead, _ in loads))
        )
        message = f"{role}: {choice.reason} (generation {generation})"
        if not all(posted):
            message += f"; {posted.count(False)} group(s) will be sent it again at the next check"
        log.info("rebalancer: %s/%s %s", owner.namespace, owner.name, message)
        await self.kube.post_event(
            event_body(
                involved={**body, "apiVersion": API_VERSION, "kind": KIND},
                reason=EVENT_REBALANCED,
                message=message,
                warning=False,
                component=COMPONENT,
                now=_rfc3339(stamp),
            )
        )
        status = status.model_copy(
            update={
                "generation": generation,
                "predicted_imbalance": round(choice.predicted, 4),
                "last_rebalance_time": stamp,
                "message": choice.reason,
            }
        )
        return RoleCheck(status=status, applied=True)

    async def _load(self, leader: Leader) -> GroupLoad | str:
        """The leader's load, or a one-line reason why not."""
        try:
            async with self.client.stream("GET", f"{leader.base}/v1/experts/load", timeout=10.0) as resp:
                if resp.status_code != 200:
                    return f"{leader.name} answered {resp.status_code}"
                raw = bytearray()
                async for chunk in resp.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_BODY:
                        return f"{leader.name}'s expert load is longer than {MAX_BODY >> 20} MiB"
            return parse_group_load(json.loads(raw))
        except httpx2.HTTPError as err:
            return f"{leader.name} did not answer: {err!r:.120}"
        except (ValueError, LoadError) as err:  # JSON or shape
            return f"{leader.name} sent an unusable expert load: {err!s:.200}"

    async def _post(self, leader: Leader, placement: Mapping[str, Any]) -> bool:
        """Send a placement to one group; True when the group took it (202, or 200: already there)."""
        try:
            resp = await self.client.post(f"{leader.base}/v1/experts/placement", json=placement, timeout=10.0)
        except httpx2.HTTPError as err:
            log.warning("rebalancer: %s did not take the placement: %r", leader.name, err)
            return False
        if resp.status_code in (200, 202):
            return True
        log.warning(
            "rebalancer: %s answered %s to placement generation %s: %.300s",
            leader.name,
            resp.status_code,
            placement.get("generation"),
            resp.text,
        )
        return False

    async def _apply_configmap(
        self, owner: Owner, role: str, data: Mapping[str, Any], *, keep: Mapping[str, Any] | None
    ) -> None:
        kept = {  # other layouts' placements go: every group runs this one (_check_role)
            key: value
            for key, value in ((keep or {}).get("data") or {}).items()
            if not key.startswith(PLACEMENT_KEY_PREFIX) and key != PLACEMENT_FILE
        }
        for key, value in data.items():
            kept[key] = json.dumps(value, separators=(",", ":"))
        await self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": experts_configmap_name(owner.name, role),
                    "namespace": owner.namespace,
                    # no deployment label: the reconciler prunes the labelled children it did not render
                    "labels": {
                        "app.kubernetes.io/part-of": "kubemoe",
                        "app.kubernetes.io/component": "experts",
                    },
                    "ownerReferences": [owner.reference()],
                },
                "data": kept,
            },
            field_manager=FIELD_MANAGER,
        )

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


def _placement_of(cm: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
    """The ConfigMap's placement for one layout (render/experts.placement_key), or None when there is
    none or it does not parse (rewritten then)."""
    raw = ((cm or {}).get("data") or {}).get(key)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if (
        not isinstance(doc, dict)
        or isinstance(doc.get("generation"), bool)
        or not isinstance(doc.get("generation"), int)
    ):
        return None
    return doc


def _rfc3339(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
