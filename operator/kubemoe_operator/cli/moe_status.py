"""What `kubectl moe status` and `kubectl moe list` show, from the objects kubectl returns: each pod's
row (role, group, the data-parallel ranks it runs, readiness), a ModelDeployment's status table, and
the list's rows. Pure: no kubectl here (cli/kubectl_moe.py runs it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_GROUP, LABEL_ROLE
from kubemoe_operator.grid import grid

ROLE_LABEL = LABEL_ROLE
GROUP_LABEL = LABEL_GROUP
DEPLOYMENT_LABEL = LABEL_DEPLOYMENT
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
"""LeaderWorkerSet's label on each pod of a group: 0 for the leader, 1.. for the workers."""
ROLE_ORDER = {"router": 0, "prefill": 1, "decode": 2, "worker": 3}


@dataclass(frozen=True)
class PodRow:
    role: str
    group: str
    name: str
    node: str
    ranks: str
    ready: str
    phase: str


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def rank_span(argv: Sequence[str], labels: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(first, count) of the data-parallel ranks a pod runs, from the runtime command line the operator
    rendered; None when it cannot tell. A LeaderWorkerSet worker's start rank is `auto`: its worker
    index (a pod label) times its local ranks, as the runtime computes it (pod/start_rank.py). An
    SGLang group over `--nnodes` pods with data-parallel attention (`--attn-dp-size`) runs its share
    of those ranks on each pod, by `--node-rank` (the worker index, which the kubelet expands)."""
    local = _flag(argv, "--data-parallel-size-local")
    if local is None and _flag(argv, "--attn-dp-size") is not None:
        return _sglang_span(argv, labels)
    if local is None:
        return (0, 1) if argv else None
    start = _flag(argv, "--data-parallel-start-rank") or "0"
    if start == "auto":
        start = (labels or {}).get(LWS_WORKER_INDEX, "")
        if not start.isdigit() or not local.isdigit():
            return None
        return int(start) * int(local), int(local)
    if not start.isdigit() or not local.isdigit():
        return None
    return int(start), int(local)


def _sglang_span(argv: Sequence[str], labels: Mapping[str, str] | None) -> tuple[int, int] | None:
    dp, nodes = _flag(argv, "--attn-dp-size") or "", _flag(argv, "--nnodes") or "1"
    node = _flag(argv, "--node-rank") or "0"
    if node.startswith("$("):  # $(LWS_WORKER_INDEX): the pod's label says it
        node = (labels or {}).get(LWS_WORKER_INDEX, "")
    if not (dp.isdigit() and nodes.isdigit() and node.isdigit()) or int(nodes) == 0:
        return None
    local = int(dp) // int(nodes)
    return (int(node) * local, local) if local else None


def pod_ranks(argv: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """The data-parallel ranks a pod runs, as the RANKS column shows them ("8-15", "3", "-")."""
    span = rank_span(argv, labels)
    if span is None:
        return "-" if not argv else "?"
    start, count = span
    return str(start) if count == 1 else f"{start}-{start + count - 1}"


def pod_argv(pod: Mapping[str, Any]) -> list[str]:
    containers = (pod.get("spec") or {}).get("containers") or []
    return [*containers[0].get("command", []), *containers[0].get("args", [])] if containers else []


def pod_row(pod: dict[str, Any]) -> PodRow:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    labels = meta.get("labels", {})
    containers = spec.get("containers", [])
    argv = pod_argv(pod)
    statuses = status.get("containerStatuses", [])
    ready = sum(1 for c in statuses if c.get("ready"))
    phase = "Terminating" if meta.get("deletionTimestamp") else status.get("phase", "Unknown")
    return PodRow(
        role=labels.get(ROLE_LABEL, "?"),
        group=labels.get(GROUP_LABEL, "-"),
        name=meta["name"],
        node=spec.get("nodeName") or "<none>",
        ranks="-" if labels.get(ROLE_LABEL) == "router" else pod_ranks(argv, labels),
        ready=f"{ready}/{len(containers)}",
        phase=phase,
    )


def _rank_key(ranks: str) -> int:
    head = ranks.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def autoscaling_bounds(auto: dict[str, Any] | None) -> str:
    """The AUTOSCALING column: off, external, 1..4, or 1..4 with the prefill:decode bounds."""
    if not auto:
        return "off"
    if auto.get("mode") == "external":
        return "external"
    bounds = f"{auto.get('minReplicas', 1)}..{auto.get('maxReplicas', '?')}"
    ratio = auto.get("perDecode")
    if ratio:
        bounds += f" ({ratio.get('min')}-{ratio.get('max')} per decode)"
    return bounds


def render_status(
    md: dict[str, Any], pods: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]]
) -> str:
    """A readable report of one ModelDeployment: pure, so it is tested on fixed objects."""
    meta, spec, status = md["metadata"], md.get("spec", {}), md.get("status", {})
    model = spec.get("model", {}).get("name", "?")
    lines = [
        f"ModelDeployment {meta.get('namespace', 'default')}/{meta['name']}  model {model}",
        f"  phase:    {status.get('phase') or 'Unknown'}"
        + (
            f" (generation {meta.get('generation')}, observed {status.get('observedGeneration')})"
            if status.get("observedGeneration") != meta.get("generation")
            else ""
        ),
        f"  layout:   {status.get('layout') or '-'}",
        f"  endpoint: {status.get('endpoint') or '-'}",
    ]
    cache = status.get("cache")
    if isinstance(cache, dict):  # model.cache: the fill's phase and progress, in the operator's words
        lines.append(f"  cache:    {cache.get('phase', '?')}: {cache.get('message') or '-'}")
    lines.append("")
    roles = status.get("roles", {})
    spec_roles = spec.get("roles", {})
    role_rows = []
    for role in sorted(roles, key=lambda r: ROLE_ORDER.get(r, 9)):
        rs = roles[role]
        auto = (spec_roles.get(role) or {}).get("autoscaling")
        bounds = autoscaling_bounds(auto)
        desired = rs.get("desired")
        role_rows.append(
            [
                role,
                str(rs.get("replicas", 0)),
                str(rs.get("ready", 0)),
                "-" if desired is None else str(desired),
                bounds,
            ]
        )
    if role_rows:
        lines += grid(["ROLE", "GROUPS", "READY", "DESIRED", "AUTOSCALING"], role_rows)
        lines.append("")

    rows = sorted(
        (pod_row(p) for p in pods),
        key=lambda r: (ROLE_ORDER.get(r.role, 9), r.group, _rank_key(r.ranks), r.name),
    )
    if rows:
        lines += grid(
            ["ROLE", "GROUP", "POD", "RANKS", "READY", "STATUS", "NODE"],
            [[r.role, r.group, r.name, r.ranks, r.ready, r.phase, r.node] for r in rows],
        )
    else:
        lines.append("no pods yet")
    lines.append("")

    conditions = status.get("conditions", [])
    if conditions:
        lines += grid(
            ["CONDITION", "STATUS", "REASON", "MESSAGE"],
            [[c["type"], c["status"], c.get("reason", ""), c.get("message", "")] for c in conditions],
        )
        lines.append("")

    scaled = [e for e in events if e.get("reason") == "Scaled"]
    scaled.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    lines.append("Autoscaler decisions:" if scaled else "Autoscaler decisions: none yet")
    lines += [
        f"  {e.get('lastTimestamp') or e.get('eventTime') or ''}  {e.get('message', '')}" for e in scaled[-5:]
    ]
    return "\n".join(lines).rstrip() + "\n"


def age(created: str | None, now: datetime) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d; '-' when unknown."""
    if not created:
        return "-"
    try:
        then = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def deployment_summary(md: Mapping[str, Any]) -> dict[str, Any]:
    """One ModelDeployment as `kubectl moe list -o json|yaml` gives it."""
    meta, spec, status = md.get("metadata") or {}, md.get("spec") or {}, md.get("status") or {}
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    roles = status.get("roles") or {}
    return {
        "namespace": meta.get("namespace", "default"),
        "name": meta.get("name", "?"),
        "model": (spec.get("model") or {}).get("name", "?"),
        "ready": ready or "Unknown",
        "phase": status.get("phase") or "Unknown",
        "layout": status.get("layout") or "",
        "roles": {
            role: {k: roles[role][k] for k in ("replicas", "ready", "desired") if k in roles[role]}
            for role in sorted(roles, key=lambda r: ROLE_ORDER.get(r, 9))
        },
        "endpoint": status.get("endpoint") or "",
        "created": meta.get("creationTimestamp"),
    }


def render_list(items: Sequence[Mapping[str, Any]], *, namespaces: bool, now: datetime) -> str:
    """`kubectl moe list`'s table: pure, so it is tested on fixed objects."""
    header = ["NAME", "MODEL", "READY", "PHASE", "LAYOUT", "GROUPS (READY/TOTAL)", "ENDPOINT", "AGE"]
    rows = []
    for md in items:
        d = deployment_summary(md)
        groups = ", ".join(
            f"{role} {r.get('ready', 0)}/{r.get('replicas', 0)}" for role, r in d["roles"].items()
        )
        row = [
            d["name"],
            d["model"],
            d["ready"],
            d["phase"],
            d["layout"] or "-",
            groups or "-",
            d["endpoint"] or "-",
            age(d["created"], now),
        ]
        rows.append([d["namespace"], *row] if namespaces else row)
    return "\n".join(grid(["NAMESPACE", *header] if namespaces else header, rows)) + "\n"
