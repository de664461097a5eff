"""What each engine supports, written once as data (issue #18's admission table).

Every rule below comes from ENGINES: `cel_rules()` turns the ones that fit the CRD into CEL (the API
server's, on ModelDeploymentSpec), `engine_problems()` is their Python twin (`kubemoe plan` and the
operator, through api/rules.py), and the planner enforces what depends on the plan itself (a
suggested parallelism that would span pods, plan/planner.py). `kubemoe plan` prints an engine's row
(cli/tables.py) and docs/spec-reference.md the whole table (gen/spec_reference.py).

Two rules are checked in Python only (`limit_problems`; the API server admits such a spec, the operator
reports Planned=False naming the field): data or expert parallelism on cpu where the engine's CPU build
cannot run it (`cpu_parallel`), and a connector whose KV stays on one machine outside `kubemoe up`
(`local_connectors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from kubemoe_operator.api.base import cel
from kubemoe_operator.api.problems import Problem

if TYPE_CHECKING:
    from kubemoe_operator.api.spec import ModelDeploymentSpec, Parallelism

EngineKind = Literal["vllm", "torch", "sglang", "tgi"]
ENGINE_KINDS: Final[tuple[str, ...]] = get_args(EngineKind)
CONNECTOR_NAMES: Final = ("nixl", "lmcache", "example", "mooncake")
ROLE_NAMES: Final = ("prefill", "decode", "worker")


@dataclass(frozen=True, kw_only=True)
class EngineSupport:
    """One engine's row of the admission table."""

    kind: EngineKind
    title: str
    tensor: bool
    """Tensor parallelism (parallelism.tensor > 1)."""
    data: bool
    """Data parallelism (parallelism.data > 1)."""
    data_needs_expert: bool = False
    """Data-parallel ranks only with expert parallelism (the torch engine's MoE-only DP)."""
    expert: bool
    """Expert parallelism (parallelism.expert > 1, or data x tensor by default)."""
    multi_pod: bool
    """Serving groups that span several pods (LeaderWorkerSet)."""
    disaggregated: bool
    """serving.mode: disaggregated (prefill and decode roles)."""
    connectors: tuple[str, ...] | None
    """serving.kvTransfer.connector values it takes; None: it moves KV its own way and ignores it."""
    accelerators: tuple[str, ...] | None
    """accelerator.type values it runs on; None: any."""
    sources: tuple[str, ...]
    """model.source schemes it loads."""
    experts: bool
    """spec.experts (redundant experts and their balancing)."""
    cpu_parallel: bool = True
    """Data and expert parallelism on accelerator.type cpu. vLLM's CPU build (0.32) has neither: data
    parallelism needs all_gatherv, which it lacks, and expert parallelism over tensor-parallel ranks
    crashes a worker; either way the group comes up Ready, then fails on its first request."""
    local_connectors: tuple[str, ...] = ()
    """Connectors whose KV stays on the machine (vLLM's ExampleConnector: a directory, /tmp unless set):
    `kubemoe up`'s only, i.e. with a file:// model.source; in a cluster each pod has its own /tmp."""
    kubemoe_metrics: bool = True
    """Its pods export the kubemoe_* series the operator's autoscaler reads (autoscaling metrics, mode
    operator): the runtime serves them for torch and re-exports vLLM's. SGLang's and TGI's own servers
    export only their own (sglang:*, tgi_*), so every metric would be missing and the role never scaled
    (a missing metric changes nothing); mode external (an HPA or ScaledObject on those series) and
    prefill's perDecode alone (it reads no metric) still work."""
    image_required: bool
    """engine.image must be given (the operator's runtime image does not hold the engine)."""
    router: str
    """What fronts it when disaggregated (or colocated with a router)."""
    instead: str
    """What to use for what it lacks, for the fixes."""
    run_here: str
    """What this repository has run of it, versus only rendered (the README's feature table)."""


ENGINES: Final[tuple[EngineSupport, ...]] = (
    EngineSupport(
        kind="vllm",
        title="vLLM",
        tensor=True,
        data=True,
        expert=True,
        multi_pod=True,
        disaggregated=True,
        connectors=("nixl", "lmcache", "example"),
        accelerators=None,
        sources=("hf", "pvc", "s3", "file"),
        experts=True,
        cpu_parallel=False,
        local_connectors=("example",),
        image_required=False,
        router="kubemoe router",
        instead="",
        run_here="served on CPU (vLLM's CPU build): colocated and P/D over ExampleConnector; every"
        " rendered argv parsed by vLLM",
    ),
    EngineSupport(
        kind="torch",
        title="torch (kubemoe's)",
        tensor=False,
        data=True,
        data_needs_expert=True,
        expert=True,
        multi_pod=True,
        disaggregated=True,
        connectors=None,
        accelerators=("cpu",),
        sources=("pvc", "file"),
        experts=True,
        image_required=False,
        router="kubemoe router",
        instead="engine.kind vllm or sglang",
        run_here="served on CPU: colocated, P/D, expert-parallel groups over pods, rebalancing",
    ),
    EngineSupport(
        kind="sglang",
        title="SGLang",
        tensor=True,
        data=True,
        expert=True,
        multi_pod=True,
        disaggregated=True,
        connectors=("nixl", "mooncake"),
        accelerators=None,
        sources=("hf", "pvc"),
        experts=False,
        kubemoe_metrics=False,
        image_required=True,
        router="sglang-router (P/D); kubemoe router (colocated)",
        instead="engine.kind vllm",
        run_here="rendered only; every rendered argv parsed by SGLang 0.5.23's and sglang-router"
        " 0.3.2's own parsers",
    ),
    EngineSupport(
        kind="tgi",
        title="TGI",
        tensor=True,
        data=False,
        expert=False,
        multi_pod=False,
        disaggregated=False,
        connectors=None,
        accelerators=None,
        sources=("hf", "pvc"),
        experts=False,
        kubemoe_metrics=False,
        image_required=True,
        router="kubemoe router",
        instead="engine.kind vllm or sglang",
        run_here="rendered only; flags checked against TGI's documented launcher options",
    ),
)
BY_KIND: Final = {e.kind: e for e in ENGINES}


def support(kind: str) -> EngineSupport:
    return BY_KIND[kind]  # type: ignore[index]


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One admission rule: a CEL expression over the spec, and the problem it reports."""

    cel: str
    field: str
    """Relative to spec (a CEL fieldPath)."""
    message: str
    fix: str

    def cel_entry(self) -> dict[str, Any]:
        return cel(self.cel, f"{self.message} Fix: {self.fix}", field_path=self.field)


def _quoted(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _words(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _role_rules(e: EngineSupport) -> list[Rule]:
    out: list[Rule] = []
    is_engine = f"self.engine.kind != '{e.kind}'"
    for role in ROLE_NAMES:
        par = f"self.roles.{role}.parallelism"
        absent = f"!has(self.roles.{role}) || !has({par})"
        where = f".roles.{role}.parallelism"
        if not e.tensor:
            out.append(
                Rule(
                    cel=f"{is_engine} || {absent} || {par}.tensor == 1",
                    field=f"{where}.tensor",
                    message=f"engine {e.kind} has no tensor parallelism.",
                    fix=f"set tensor: 1 (spread the experts with data and expert), or use {e.instead}.",
                )
            )
        if not e.data:
            out.append(
                Rule(
                    cel=f"{is_engine} || {absent} || {par}.data == 1",
                    field=f"{where}.data",
                    message=f"engine {e.kind} has no data parallelism.",
                    fix=f"set data: 1 and shard with tensor, or use {e.instead} for data and expert"
                    " parallelism.",
                )
            )
        if e.data_needs_expert:
            out.append(
                Rule(
                    cel=f"{is_engine} || {absent} || {par}.data == 1 || !has({par}.expert)"
                    f" || {par}.expert != 1",
                    field=f"{where}.expert",
                    message=f"engine {e.kind} runs data-parallel ranks only with expert parallelism.",
                    fix="omit expert (it defaults to data x tensor), or set data: 1.",
                )
            )
        if not e.expert:
            out.append(
                Rule(
                    cel=f"{is_engine} || {absent} || !has({par}.expert) || {par}.expert == 1",
                    field=f"{where}.expert",
                    message=f"engine {e.kind} has no expert parallelism (its experts are sharded by"
                    " tensor parallelism).",
                    fix=f"omit expert or set expert: 1, or use {e.instead} for expert parallelism.",
                )
            )
        if not e.multi_pod:
            per_pod = "(has(self.accelerator.perPod) ? self.accelerator.perPod : 8)"
            out.append(
                Rule(
                    cel=f"{is_engine} || {absent} || {par}.tensor * {par}.data <= {per_pod}",
                    field=where,
                    message=f"engine {e.kind} serves each group from one pod, and data x tensor is"
                    " more than accelerator.perPod.",
                    fix=f"make data x tensor <= accelerator.perPod, or use {e.instead} for groups that"
                    " span pods.",
                )
            )
    return out


def engine_rules(e: EngineSupport) -> list[Rule]:
    """Every rule that engine `e`'s row implies, as CEL (on ModelDeploymentSpec) and problem text."""
    is_engine = f"self.engine.kind != '{e.kind}'"
    rules = _role_rules(e)
    if not e.disaggregated:
        rules.append(
            Rule(
                cel=f"{is_engine} || self.serving.mode == 'colocated'",
                field=".serving.mode",
                message=f"engine {e.kind} has no prefill/decode disaggregation.",
                fix=f"set serving.mode: colocated with one worker role, or use {e.instead}.",
            )
        )
    if e.disaggregated and e.connectors is not None:
        rules.append(
            Rule(
                cel=f"{is_engine} || self.serving.mode != 'disaggregated'"
                f" || self.serving.kvTransfer.connector in {_quoted(e.connectors)}",
                field=".serving.kvTransfer.connector",
                message=f"engine {e.kind} hands KV over with {_words(e.connectors)} only.",
                fix=f"set serving.kvTransfer.connector to one of {_words(e.connectors)}.",
            )
        )
    if e.accelerators is not None:
        rules.append(
            Rule(
                cel=f"{is_engine} || self.accelerator.type.lowerAscii() in {_quoted(e.accelerators)}",
                field=".accelerator.type",
                message=f"engine {e.kind} runs on {_words(e.accelerators)} only.",
                fix=f"set accelerator.type: {e.accelerators[0]}, or use {e.instead} on accelerators.",
            )
        )
    schemes = " || ".join(f"self.model.source.startsWith('{s}://')" for s in e.sources)
    if _cache_loads(e):
        schemes += " || has(self.model.cache)"
    rules.append(
        Rule(
            cel=f"{is_engine} || {schemes}",
            field=".model.source",
            message=f"engine {e.kind} loads weights from {_source_words(e)} only.",
            fix=_source_fix(e),
        )
    )
    if not e.experts:
        rules.append(
            Rule(
                cel=f"{is_engine} || !has(self.experts)",
                field=".experts",
                message=f"engine {e.kind} does not take spec.experts (redundant experts and their"
                " balancing are vllm's and torch's).",
                fix="remove experts, or use engine.kind vllm.",
            )
        )
    if not e.kubemoe_metrics:
        rules += [_metrics_rule(e, role) for role in ROLE_NAMES]
    if e.image_required:
        rules.append(
            Rule(
                cel=f"{is_engine} || has(self.engine.image)",
                field=".engine.image",
                message=f"engine {e.kind} runs from its own image, which the operator does not know.",
                fix=f"set engine.image to a {e.title} image (the router keeps the operator's runtime image).",
            )
        )
    if e.kind == "sglang":
        rules.append(
            Rule(
                cel=f"{is_engine} || self.serving.mode != 'disaggregated' || !has(self.router.apiKeySecret)",
                field=".router.apiKeySecret",
                message="an sglang disaggregated deployment is routed by sglang-router, which reads no"
                " API key file.",
                fix="remove router.apiKeySecret (admit clients with router.allowFrom), or set"
                " serving.mode: colocated (kubemoe's router checks keys).",
            )
        )
    return rules


def _metrics_rule(e: EngineSupport, role: str) -> Rule:
    """Autoscaling metrics on a role of an engine whose pods export no kubemoe_* series."""
    scale = f"self.roles.{role}.autoscaling"
    return Rule(
        cel=f"self.engine.kind != '{e.kind}' || !has(self.roles.{role}) || !has({scale})"
        f" || !has({scale}.metrics) || size({scale}.metrics) == 0",
        field=f".roles.{role}.autoscaling.metrics",
        message=f"engine {e.kind}'s pods run {e.title}'s own server, which exports none of the kubemoe_*"
        " series the operator's autoscaler reads: every metric would be missing, and the role would"
        " never scale.",
        fix="remove metrics and set autoscaling.mode: external with an HPA or KEDA ScaledObject on the"
        " engine's own series (examples/autoscaling-external), or use engine.kind vllm; prefill may keep"
        " perDecode without metrics to follow decode.",
    )


def _cache_loads(e: EngineSupport) -> bool:
    """model.cache turns an hf:// source into a claim the pods mount: any engine that loads pvc://."""
    return "pvc" in e.sources and "hf" not in e.sources


def _source_words(e: EngineSupport) -> str:
    words = _words(tuple(s + "://" for s in e.sources))
    return f"{words}, or hf:// with model.cache" if _cache_loads(e) else words


def _source_fix(e: EngineSupport) -> str:
    if e.sources == ("pvc", "file"):
        return (
            "put the checkpoint on a PersistentVolumeClaim (pvc://CLAIM/PATH), fill one from the Hub with"
            " model.cache (hf://ORG/NAME), or use file://PATH for kubemoe up."
        )
    if "file" not in e.sources:
        return (
            "use hf://ORG/NAME or pvc://CLAIM/PATH (file:// is kubemoe up's, which runs vllm and torch only)."
        )
    return f"use one of {_words(tuple(s + '://' for s in e.sources))}."


def all_rules() -> list[tuple[EngineSupport, Rule]]:
    return [(e, r) for e in ENGINES for r in engine_rules(e)]


def cel_rules() -> list[dict[str, Any]]:
    """The CEL of every rule, for ModelDeploymentSpec's x-kubernetes-validations."""
    return [r.cel_entry() for _, r in all_rules()]


def expert_default(kind: str, par: Parallelism) -> Parallelism:
    """`par` with expert 1 where the engine has no expert parallelism and the spec left it out."""
    if support(kind).expert or par.expert is not None:
        return par
    return par.model_copy(update={"expert": 1})


def engine_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """The Python twin of cel_rules(): every rule of spec.engine.kind's row the spec breaks."""
    e = support(spec.engine.kind)
    problems: list[Problem] = []

    def add(rule: Rule) -> None:
        problems.append(Problem(field="spec" + rule.field, message=rule.message, fix=rule.fix))

    by_field = {r.field: r for r in engine_rules(e)}
    for name, role in spec.roles.items():
        par = role.parallelism
        if par is None:
            continue
        where = f".roles.{name}.parallelism"
        if not e.tensor and par.tensor != 1:
            add(by_field[f"{where}.tensor"])
        if not e.data and par.data != 1:
            add(by_field[f"{where}.data"])
        if e.data_needs_expert and par.data != 1 and par.expert == 1:
            add(by_field[f"{where}.expert"])
        if not e.expert and par.expert not in (None, 1):
            add(by_field[f"{where}.expert"])
        if not e.multi_pod and par.ranks > spec.accelerator.per_pod:
            add(by_field[where])
    if not e.disaggregated and spec.serving.mode != "colocated":
        add(by_field[".serving.mode"])
    connector = spec.serving.kv_transfer.connector
    if e.connectors is not None and spec.serving.mode == "disaggregated" and connector not in e.connectors:
        add(by_field[".serving.kvTransfer.connector"])
    if e.accelerators is not None and spec.accelerator.type.lower() not in e.accelerators:
        add(by_field[".accelerator.type"])
    cached = _cache_loads(e) and spec.model.cache is not None
    if not cached and not any(spec.model.source.startswith(f"{s}://") for s in e.sources):
        add(by_field[".model.source"])
    if not e.experts and spec.experts is not None:
        add(by_field[".experts"])
    if e.image_required and spec.engine.image is None:
        add(by_field[".engine.image"])
    if not e.kubemoe_metrics:
        for name, role in spec.roles.items():
            if role.autoscaling is not None and role.autoscaling.metrics:
                add(by_field[f".roles.{name}.autoscaling.metrics"])
    if e.kind == "sglang" and spec.serving.mode == "disaggregated" and spec.router.api_key_secret is not None:
        add(by_field[".router.apiKeySecret"])
    return problems + limit_problems(spec)


def limit_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """The rules checked in Python only (module docstring): cpu_parallel and local_connectors."""
    e, problems = support(spec.engine.kind), []
    if not e.cpu_parallel and spec.accelerator.type.lower() == "cpu":
        for name, role in spec.roles.items():
            par = role.parallelism
            if par is None or (par.data == 1 and not par.expert_parallel):
                continue
            which = "data" if par.data > 1 else "expert"
            problems.append(
                Problem(
                    field=f"spec.roles.{name}.parallelism.{which}",
                    message=f"engine {e.kind} on accelerator.type cpu runs no data or expert parallelism"
                    f" (data {par.data}, expert {par.expert_size}): vLLM's CPU build has no all_gatherv"
                    " for data parallelism, and its expert parallelism over tensor ranks crashes a"
                    " worker; the group comes up Ready, then fails on its first request.",
                    fix="set data: 1 and expert: 1 (tensor parallelism alone runs), or use engine.kind"
                    " torch (expert-parallel groups on cpu).",
                )
            )
    connector = spec.serving.kv_transfer.connector
    local = spec.model.source.startswith("file://")
    if spec.serving.mode == "disaggregated" and connector in e.local_connectors and not local:
        problems.append(
            Problem(
                field="spec.serving.kvTransfer.connector",
                message=f"connector {connector} (vLLM's ExampleConnector) hands KV over through a directory"
                " on one machine (/tmp by default); in a cluster prefill and decode pods each have their"
                " own, and decode would silently prefill every prompt again. It is for `kubemoe up`"
                " (a file:// model.source) only.",
                fix="set serving.kvTransfer.connector: nixl.",
            )
        )
    return problems


def _connector_words(e: EngineSupport) -> str:
    return ", ".join(f"{c} (kubemoe up only)" if c in e.local_connectors else c for c in e.connectors or ())


def describe(e: EngineSupport) -> list[tuple[str, str]]:
    """An engine's row as (what, value) pairs, for `kubemoe plan` and the spec reference."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    data = "with expert parallelism only" if e.data_needs_expert else yes(e.data)
    not_cpu = "" if e.cpu_parallel else ", not on cpu"
    return [
        ("tensor parallelism", yes(e.tensor)),
        ("data parallelism", data + (not_cpu if e.data else "")),
        ("expert parallelism", yes(e.expert) + (not_cpu if e.expert else "")),
        ("groups over several pods", yes(e.multi_pod)),
        ("disaggregation (P/D)", yes(e.disaggregated)),
        (
            "KV connectors",
            "-"
            if not e.disaggregated
            else "its own hand-off (connector ignored)"
            if e.connectors is None
            else _connector_words(e),
        ),
        ("accelerators", "any" if e.accelerators is None else _words(e.accelerators)),
        ("model sources", _source_words(e)),
        ("spec.experts", yes(e.experts)),
        ("engine.image", "required" if e.image_required else "optional (the runtime image)"),
        (
            "autoscaling metrics (mode operator)",
            "yes" if e.kubemoe_metrics else "no (mode external, or prefill's perDecode alone)",
        ),
        ("router", e.router),
        ("run here", e.run_here),
    ]
