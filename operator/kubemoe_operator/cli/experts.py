"""`kubectl moe experts NAME`: the expert load of each expert-parallel role, from the ConfigMap the
operator's rebalance loop writes (`<deployment>-<role>-experts`: the placement of the groups' layout,
placement-RANKSxSLOTS-MODEL.json, then rebalance.json and observed.json; docs/expert-load.md has the
format).

Pure: the command (kubectl_moe.py) fetches the objects; this module reads them, checks them and
renders the report, so it is tested on fixed objects. Every problem is an ExpertsError whose text is
one line for the user.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import API_VERSION, KIND
from kubemoe_operator.api.spec import RebalanceSpec
from kubemoe_operator.grid import grid
from kubemoe_operator.plan import experts as placement_math
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render.experts import PLACEMENT_KEY_PREFIX, model_digest
from kubemoe_operator.render.names import experts_configmap_name

ROLES = ("prefill", "decode", "worker")
REBALANCE, OBSERVED = "rebalance.json", "observed.json"
LEGACY_PLACEMENT = "placement.json"
"""Where operators before placements were keyed by layout kept the one placement."""
DEFAULT_TOP = 3


class ExpertsError(RuntimeError):
    """A problem the user sees as one line (no traceback)."""


# --- the ConfigMap's documents ---------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


D = TypeVar("D", bound=_Doc)

Count = float  # token counts: integers by contract, floats accepted
_Tokens = list[list[Count]]


class PlacementLayer(_Doc):
    layer: int = Field(ge=0)
    slots: list[int]


class PlacementDoc(_Doc):
    generation: int = Field(ge=0)
    ranks: int = Field(ge=1)
    slots_per_rank: int = Field(alias="slotsPerRank", ge=1)
    layers: list[PlacementLayer]

    @model_validator(mode="after")
    def _shape(self) -> PlacementDoc:
        want = self.ranks * self.slots_per_rank
        seen: set[int] = set()
        for i, layer in enumerate(self.layers):
            if len(layer.slots) != want:
                raise ValueError(
                    f"layers[{i}].slots has {len(layer.slots)} entries, not ranks x slotsPerRank = {want}"
                )
            if any(e < 0 for e in layer.slots):
                raise ValueError(f"layers[{i}].slots holds a negative expert id")
            if layer.layer in seen:
                raise ValueError(f"layers[{i}]: layer {layer.layer} appears twice")
            seen.add(layer.layer)
        return self


def _same_lengths(doc: BaseModel, names: Sequence[str]) -> None:
    lengths = {name: len(getattr(doc, name)) for name in names}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{n} {v}" for n, v in lengths.items())
        raise ValueError(f"the per-layer lists differ in length ({listed})")


class RebalanceDoc(_Doc):
    generation: int = Field(ge=0)
    time: str = ""
    window_seconds: float | None = Field(None, alias="windowSeconds", ge=0)
    ranks: int | None = Field(None, ge=1)
    slots_per_rank: int | None = Field(None, alias="slotsPerRank", ge=1)
    placement_key: str | None = Field(None, alias="placementKey")
    """The layout's placement key it was computed for (records before these three name none)."""
    not_applied: str | None = Field(None, alias="notApplied")
    """Why the groups gave the placement up, when the rebalancer gave it up too."""
    layers: list[int]
    tokens: _Tokens
    previous_slots: list[list[int]] = Field(alias="previousSlots")
    slots: list[list[int]]
    imbalance_before: list[float] = Field(alias="imbalanceBefore")
    imbalance_predicted: list[float] = Field(alias="imbalancePredicted")

    @model_validator(mode="after")
    def _shape(self) -> RebalanceDoc:
        _same_lengths(
            self, ("layers", "tokens", "previous_slots", "slots", "imbalance_before", "imbalance_predicted")
        )
        return self


class ObservedDoc(_Doc):
    time: str = ""
    generation: int | None = Field(None, ge=0)
    layers: list[int]
    tokens: _Tokens
    imbalance: list[float] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ObservedDoc:
        _same_lengths(self, ("layers", "tokens", *(("imbalance",) if self.imbalance is not None else ())))
        return self


def other_layout(rb: RebalanceDoc, placement: PlacementDoc, key: str) -> str | None:
    """Why the rebalance record is not of the layout of `placement` (under `key`), or None when it is.
    After a change of layout (spec.experts.redundant, the role's parallelism, the model) the record of
    the old one may still be there: its slots do not describe the groups' placement."""
    layout = f"{placement.ranks} ranks x {placement.slots_per_rank} slots"
    if rb.placement_key is not None and rb.placement_key != key:
        return f"it is of another layout ({rb.placement_key}) than the placement's ({key})"
    if (rb.ranks is not None and rb.ranks != placement.ranks) or (
        rb.slots_per_rank is not None and rb.slots_per_rank != placement.slots_per_rank
    ):
        return f"it is of {rb.ranks} ranks x {rb.slots_per_rank} slots, the placement of {layout}"
    width = placement.ranks * placement.slots_per_rank
    lengths = sorted({len(row) for row in (*rb.slots, *rb.previous_slots)} - {width})
    if lengths:
        return f"its layers have {lengths[0]} slots, the placement's {width} ({layout})"
    return None


def _first_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _placement_key(cm: Mapping[str, Any], source: str) -> str | None:
    """The key of the placement the role's groups run: the rebalancer keeps one layout's
    (render/experts.placement_key); of several, one for the ModelDeployment's model."""
    keys = sorted(str(k) for k in (cm.get("data") or {}) if str(k).startswith(PLACEMENT_KEY_PREFIX))
    ours = [k for k in keys if k.endswith(f"-{model_digest(source)}.json")]
    if keys:
        return (ours or keys)[-1]
    return LEGACY_PLACEMENT if LEGACY_PLACEMENT in (cm.get("data") or {}) else None


def _load(cm: Mapping[str, Any], key: str, model: type[D], *, where: str) -> D | None:
    raw = (cm.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ExpertsError(f"{where}: key {key} is not valid JSON ({err})") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ExpertsError(f"{where}: key {key}: {_first_error(err)}") from None


# --- the report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hot:
    """One of a layer's hottest experts."""

    expert: int
    tokens: float
    share: float
    """Of the layer's tokens, 0..1."""
    ranks: tuple[int, ...]
    """The rank of each copy under the current placement (placement.json), ascending: a rank holding
    two copies appears twice."""

    def cell(self) -> str:
        counts = {r: self.ranks.count(r) for r in self.ranks}
        ranks = ",".join(f"r{r}" + (f"x{n}" if n > 1 else "") for r, n in counts.items()) or "?"
        return f"e{self.expert} {self.share * 100:.1f}% {ranks}"


@dataclass(frozen=True)
class LayerRow:
    layer: int
    imbalance: float | None
    """Now (observed.json), or None before the first observation."""
    imbalance_before: float | None
    imbalance_predicted: float | None
    hottest: tuple[Hot, ...]


@dataclass(frozen=True)
class RoleLoad:
    """One role's ConfigMap, read and checked."""

    role: str
    config_map: str
    placement: PlacementDoc
    rebalance: RebalanceDoc | None
    observed: ObservedDoc | None
    status: Mapping[str, Any] = field(default_factory=dict)
    """status.experts.<role>, as the operator wrote it."""
    rebalance_ignored: str | None = None
    """Why the ConfigMap's rebalance.json is not shown (`other_layout`), when it is not."""

    def slots_of(self, layer: int) -> tuple[int, ...] | None:
        for entry in self.placement.layers:
            if entry.layer == layer:
                return tuple(entry.slots)
        return None

    def layer_ids(self) -> list[int]:
        ids = {entry.layer for entry in self.placement.layers}
        ids.update(self.observed.layers if self.observed else ())
        ids.update(self.rebalance.layers if self.rebalance else ())
        return sorted(ids)


@dataclass(frozen=True)
class RoleReport:
    load: RoleLoad
    rows: tuple[LayerRow, ...]


@dataclass(frozen=True)
class Report:
    name: str
    namespace: str
    roles: tuple[RoleReport, ...]
    missing: tuple[tuple[str, str], ...]
    """(role, ConfigMap name) of the roles with no ConfigMap yet."""
    interval_seconds: int | None
    """spec.experts.rebalance.intervalSeconds; None when spec.experts is not set."""
    engine: str = "torch"
    """spec.engine.kind."""


def copy_ranks(slots: Sequence[int], expert: int, *, ranks: int) -> tuple[int, ...]:
    """The rank of each copy of `expert` (physical slot p is on rank p // S), ascending."""
    per_rank = len(slots) // ranks
    return tuple(p // per_rank for p, e in enumerate(slots) if e == expert)


def hottest(tokens: Sequence[float], slots: Sequence[int] | None, *, ranks: int, top: int) -> tuple[Hot, ...]:
    """The `top` experts with the most tokens (ties: lower id), each with its share and copies' ranks."""
    total = math.fsum(tokens)
    if total <= 0 or top <= 0:
        return ()
    order = sorted(range(len(tokens)), key=lambda e: (-tokens[e], e))[:top]
    return tuple(
        Hot(
            expert=e,
            tokens=tokens[e],
            share=tokens[e] / total,
            ranks=copy_ranks(slots, e, ranks=ranks) if slots is not None else (),
        )
        for e in order
        if tokens[e] > 0
    )


def _check_load(load: RoleLoad, key: str, layer: int, tokens: Sequence[float], slots: Sequence[int]) -> float:
    """The layer's imbalance under `slots`, or ExpertsError naming the key when they do not fit."""
    try:
        return placement_math.imbalance(tokens, slots, ranks=load.placement.ranks)
    except ValueError as err:
        raise ExpertsError(f"ConfigMap {load.config_map}: key {key}: layer {layer}: {err}") from None


def role_report(load: RoleLoad, *, top: int) -> RoleReport:
    """The per-layer rows of one role; ExpertsError when the documents disagree on a layer's shape."""
    observed = {layer: i for i, layer in enumerate(load.observed.layers)} if load.observed is not None else {}
    rebalanced = (
        {layer: i for i, layer in enumerate(load.rebalance.layers)} if load.rebalance is not None else {}
    )
    rows = []
    for layer in load.layer_ids():
        slots = load.slots_of(layer)
        now: float | None = None
        tokens: Sequence[float] | None = None
        if load.observed is not None and layer in observed:
            i = observed[layer]
            tokens = load.observed.tokens[i]
            computed = _check_load(load, OBSERVED, layer, tokens, slots) if slots is not None else None
            now = load.observed.imbalance[i] if load.observed.imbalance is not None else computed
        before = predicted = None
        if load.rebalance is not None and layer in rebalanced:
            i = rebalanced[layer]
            rb = load.rebalance
            if len(rb.slots[i]) != len(rb.previous_slots[i]):
                raise ExpertsError(
                    f"ConfigMap {load.config_map}: key {REBALANCE}: layer {layer}: slots has"
                    f" {len(rb.slots[i])} entries, previousSlots {len(rb.previous_slots[i])}"
                )
            for name, layout in (("previousSlots", rb.previous_slots[i]), ("slots", rb.slots[i])):
                if len(layout) % load.placement.ranks:
                    raise ExpertsError(
                        f"ConfigMap {load.config_map}: key {REBALANCE}: layer {layer}: {name} has"
                        f" {len(layout)} entries, not a multiple of the {load.placement.ranks} ranks"
                    )
                _check_load(load, REBALANCE, layer, rb.tokens[i], layout)
            before, predicted = rb.imbalance_before[i], rb.imbalance_predicted[i]
            if tokens is None:
                tokens = rb.tokens[i]
        rows.append(
            LayerRow(
                layer=layer,
                imbalance=now,
                imbalance_before=before,
                imbalance_predicted=predicted,
                hottest=hottest(tokens, slots, ranks=load.placement.ranks, top=top) if tokens else (),
            )
        )
    return RoleReport(load=load, rows=tuple(rows))


# --- from the cluster's objects --------------------------------------------------------------------


def expert_parallel_roles(md: Mapping[str, Any]) -> dict[str, int]:
    """Each role with expert parallelism (EP size > 1) and its EP size, from the plan of the spec (what
    the operator plans too); when the spec does not plan, the roles status.experts names."""
    name = md["metadata"]["name"]
    try:
        parsed = parse_manifest(
            {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": md.get("spec")}
        )
        plan = plan_manifest(parsed)
    except ManifestError:
        known = (md.get("status") or {}).get("experts") or {}
        return {role: 0 for role in ROLES if role in known}
    return {r.role: r.expert for r in plan.roles if r.expert_parallel and r.expert > 1}


def _interval(md: Mapping[str, Any]) -> int | None:
    experts = (md.get("spec") or {}).get("experts")
    if experts is None:
        return None
    value = (experts.get("rebalance") or {}).get("intervalSeconds")
    return value if isinstance(value, int) else RebalanceSpec().interval_seconds


def select_roles(md: Mapping[str, Any], role: str | None) -> list[str]:
    """The expert-parallel roles to report (all, or `role`), in serving order; ExpertsError if none."""
    name = md["metadata"]["name"]
    ep = expert_parallel_roles(md)
    if role is None:
        if not ep:
            roles = [r for r in ROLES if r in ((md.get("spec") or {}).get("roles") or {})]
            raise ExpertsError(
                f"ModelDeployment {name} has no role with expert parallelism"
                f" (roles: {', '.join(roles) or 'none'}); expert load is kept per expert-parallel group"
            )
        return [r for r in ROLES if r in ep]
    if role not in ep:
        others = ", ".join(r for r in ROLES if r in ep) or "none"
        raise ExpertsError(
            f"role {role} of ModelDeployment {name} has no expert parallelism (roles with it: {others})"
        )
    return [role]


def no_load_message(name: str, missing: Sequence[str], interval: int | None, engine: str = "torch") -> str:
    """The line for roles whose ConfigMap does not exist yet (`interval` None: spec.experts is not set)."""
    when = f"{interval} s" if interval is not None else "600 s by default"
    line = (
        f"no expert load yet: the operator writes {', '.join(missing)} at its first rebalance interval"
        f" (spec.experts.rebalance.intervalSeconds, {when})"
    )
    if engine != "torch":
        line += (
            f"; but {name} runs the {engine} engine, which balances its own experts: the operator"
            " rebalances, and writes it, for the torch engine only"
        )
    elif interval is None:
        line += f"; spec.experts is not set on {name}, and without it nothing is rebalanced"
    return line


def _engine(md: Mapping[str, Any]) -> str:
    engine = ((md.get("spec") or {}).get("engine") or {}).get("kind") or "vllm"
    return str(engine)


def build_report(
    md: Mapping[str, Any],
    config_maps: Mapping[str, Mapping[str, Any] | None],
    *,
    roles: Sequence[str],
    top: int = DEFAULT_TOP,
) -> Report:
    """The report for `roles` from the ModelDeployment and each role's ConfigMap (None: not there)."""
    meta = md["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    status = ((md.get("status") or {}).get("experts")) or {}
    reports, missing = [], []
    for role in roles:
        cm_name = experts_configmap_name(name, role)
        cm = config_maps.get(role)
        if cm is None:
            missing.append((role, cm_name))
            continue
        where = f"ConfigMap {namespace}/{cm_name}"
        key = _placement_key(cm, str(((md.get("spec") or {}).get("model") or {}).get("source", "")))
        placement = None if key is None else _load(cm, key, PlacementDoc, where=where)
        if placement is None:
            raise ExpertsError(
                f"{where} has no placement yet ({PLACEMENT_KEY_PREFIX}RANKSxSLOTS-MODEL.json): the operator "
                "writes it at its first check once every group of the role runs one layout"
            )
        rebalance = _load(cm, REBALANCE, RebalanceDoc, where=where)
        ignored = None if rebalance is None or key is None else other_layout(rebalance, placement, key)
        load = RoleLoad(
            role=role,
            config_map=f"{namespace}/{cm_name}",
            placement=placement,
            rebalance=None if ignored else rebalance,
            observed=_load(cm, OBSERVED, ObservedDoc, where=where),
            status=status.get(role) or {},
            rebalance_ignored=ignored,
        )
        reports.append(role_report(load, top=top))
    if not reports:
        raise ExpertsError(no_load_message(name, [m for _, m in missing], _interval(md), _engine(md)))
    return Report(
        name=name,
        namespace=namespace,
        roles=tuple(reports),
        missing=tuple(missing),
        interval_seconds=_interval(md),
        engine=_engine(md),
    )


# --- output ----------------------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _max(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def render_report(report: Report) -> str:
    lines = [f"ModelDeployment {report.namespace}/{report.name}: expert load", ""]
    for rr in report.roles:
        load, p = rr.load, rr.load.placement
        lines.append(
            f"{load.role}: placement generation {p.generation}, {p.ranks} ranks x {p.slots_per_rank} slots"
            f"  (ConfigMap {load.config_map})"
        )
        rb = load.rebalance
        if rb is None and load.rebalance_ignored:
            lines.append(
                f"  last rebalance: none of this layout yet ({REBALANCE} not shown: {load.rebalance_ignored})"
            )
        elif rb is None:
            lines.append("  last rebalance: none yet (the default placement)")
        else:
            window = f" ({rb.window_seconds:g} s window)" if rb.window_seconds else ""
            lines.append(
                f"  last rebalance: generation {rb.generation} at {rb.time or '?'}{window}: worst layer"
                f" {_ratio(_max(rb.imbalance_before))} -> {_ratio(_max(rb.imbalance_predicted))} predicted"
            )
            if rb.not_applied:
                lines.append(f"  not applied:    the groups gave it up: {rb.not_applied}")
        obs = load.observed
        if obs is None:
            lines.append("  observed:       no load yet")
        else:
            gen = "" if obs.generation is None else f" under generation {obs.generation}"
            lines.append(
                f"  observed:       {obs.time or '?'}{gen}: worst layer"
                f" {_ratio(_max([r.imbalance for r in rr.rows]))}"
            )
            if obs.generation is not None and obs.generation != p.generation:
                lines.append(
                    f"  note: observed under generation {obs.generation}, before the move to generation"
                    f" {p.generation}: NOW is the old placement's until the next check"
                )
        if load.status.get("message"):
            lines.append(f"  status:         {load.status['message']}")
        lines += [
            "  " + line
            for line in grid(
                [
                    "LAYER",
                    "NOW",
                    "BEFORE",
                    "PREDICTED",
                    "HOTTEST EXPERTS (share of tokens, ranks with a copy)",
                ],
                [
                    [
                        str(r.layer),
                        _ratio(r.imbalance),
                        _ratio(r.imbalance_before),
                        _ratio(r.imbalance_predicted),
                        "  ".join(h.cell() for h in r.hottest) or "-",
                    ]
                    for r in rr.rows
                ],
            )
        ]
        lines.append("")
    for role, _cm in report.missing:
        lines.append(
            f"{role}: " + no_load_message(report.name, [_cm], report.interval_seconds, report.engine)
        )
    lines.append("NOW, BEFORE, PREDICTED: the busiest rank's load over the mean rank load (1.00 is even).")
    return "\n".join(lines).rstrip() + "\n"


def report_data(report: Report) -> dict[str, Any]:
    """The report as plain data (`-o json|yaml`)."""
    roles = []
    for rr in report.roles:
        load = rr.load
        rb = load.rebalance
        roles.append(
            {
                "role": load.role,
                "configMap": load.config_map,
                "generation": load.placement.generation,
                "ranks": load.placement.ranks,
                "slotsPerRank": load.placement.slots_per_rank,
                "lastRebalanceTime": rb.time if rb else None,
                "lastRebalanceGeneration": rb.generation if rb else None,
                "lastRebalanceNotApplied": rb.not_applied if rb else None,
                "lastRebalanceIgnored": load.rebalance_ignored,
                "observedTime": load.observed.time if load.observed else None,
                "observedGeneration": load.observed.generation if load.observed else None,
                "status": dict(load.status),
                "layers": [
                    {
                        "layer": r.layer,
                        "imbalance": r.imbalance,
                        "imbalanceBefore": r.imbalance_before,
                        "imbalancePredicted": r.imbalance_predicted,
                        "hottest": [
                            {"expert": h.expert, "tokens": h.tokens, "share": h.share, "ranks": list(h.ranks)}
                            for h in r.hottest
                        ],
                    }
                    for r in rr.rows
                ],
            }
        )
    return {
        "name": report.name,
        "namespace": report.namespace,
        "roles": roles,
        "missing": [
            {
                "role": role,
                "configMap": cm,
                "message": no_load_message(report.name, [cm], report.interval_seconds, report.engine),
            }
            for role, cm in report.missing
        ],
    }
