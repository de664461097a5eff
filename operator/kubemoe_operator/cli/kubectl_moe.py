"""`kubectl moe`: a kubectl plugin (the executable `kubectl-moe`).

- `kubectl moe list [-A] [-n NS] [-o table|json|yaml]`: every ModelDeployment: model, readiness, phase,
  layout, ready groups per role, endpoint, age.
- `kubectl moe status NAME [-n NS] [-o table|json|yaml]`: roles, groups, ranks per pod, readiness, the
  autoscaler's decisions and the endpoint of one ModelDeployment.
- `kubectl moe logs NAME --role ROLE [--group N] [--rank N] [-f]`: the engine logs of a role's pods (one
  group, or the pod running one data-parallel rank), through `kubectl logs` with the pods' labels.
- `kubectl moe experts NAME [-n NS] [--role ROLE] [--top K] [--plot FILE.png]`: per expert-parallel
  role, each layer's imbalance (now, and before/predicted at the last rebalance) and its hottest
  experts with the ranks holding their copies (cli/experts.py; the heatmaps: cli/plot.py).
- `kubectl moe plan FILE [-o table|json|yaml]`: the same as `kubemoe plan`.
- `kubectl moe completion bash|zsh`, `kubectl moe --version`.

It reads the cluster through the real kubectl (the one that invoked it, found on PATH), so
contexts, kubeconfigs and credentials behave exactly as they do for kubectl itself. Every error is one
line (cli/errors.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_GROUP, LABEL_ROLE, ROUTER
from kubemoe_operator.cli import kubemoe as cli
from kubemoe_operator.cli.completion import FILES, add_completion
from kubemoe_operator.cli.errors import add_version, run_main
from kubemoe_operator.cli.experts import (
    DEFAULT_TOP,
    ROLES,
    ExpertsError,
    build_report,
    report_data,
    select_roles,
)
from kubemoe_operator.cli.experts import render_report as render_experts
from kubemoe_operator.grid import grid
from kubemoe_operator.render.names import experts_configmap_name
from kubemoe_operator.render.pods import CONTAINER, LWS_GROUP_INDEX

ROLE_LABEL = LABEL_ROLE
GROUP_LABEL = LABEL_GROUP
DEPLOYMENT_LABEL = LABEL_DEPLOYMENT
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
"""LeaderWorkerSet's label on each pod of a group: 0 for the leader, 1.. for the workers."""
ROLE_ORDER = {"router": 0, "prefill": 1, "decode": 2, "worker": 3}
LOG_ROLES = ("prefill", "decode", "worker", ROUTER)
MD_RESOURCE = "modeldeployments.kubemoe.io"


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
    index (a pod label) times its local ranks, as the runtime computes it (pod/start_rank.py)."""
    local = _flag(argv, "--data-parallel-size-local")
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


def pod_ranks(argv: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """The data-parallel ranks a pod runs, as the RANKS column shows them ("8-15", "3", "-")."""
    span = rank_span(argv, labels)
    if span is None:
        return "-" if not argv else "?"
    start, count = span
    return str(start) if count == 1 else f"{start}-{start + count - 1}"


def _argv(pod: Mapping[str, Any]) -> list[str]:
    containers = (pod.get("spec") or {}).get("containers") or []
    return [*containers[0].get("command", []), *containers[0].get("args", [])] if containers else []


def pod_row(pod: dict[str, Any]) -> PodRow:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    labels = meta.get("labels", {})
    containers = spec.get("containers", [])
    argv = _argv(pod)
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


class KubectlError(RuntimeError):
    pass


def _last_line(stderr: str, fallback: str) -> str:
    """kubectl's error, one line: its last (client-go's retry logging comes before it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else fallback


def _kubectl(base: Sequence[str], *args: str) -> Any:
    proc = subprocess.run([*base, *args, "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KubectlError(_last_line(proc.stderr, f"kubectl {' '.join(args)} failed"))
    return json.loads(proc.stdout)


def _kubectl_base(args: argparse.Namespace) -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl moe: kubectl not found on PATH", file=sys.stderr)
        return None
    base = [kubectl]
    if args.kubeconfig:
        base += ["--kubeconfig", args.kubeconfig]
    if args.context:
        base += ["--context", args.context]
    if args.namespace:
        base += ["--namespace", args.namespace]
    return base


def _get_optional(base: Sequence[str], resource: str, name: str) -> Any:
    """The object, or None when it does not exist."""
    proc = subprocess.run(
        [*base, "get", resource, name, "--ignore-not-found", "-o", "json"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise KubectlError(_last_line(proc.stderr, f"kubectl get {resource} {name} failed"))
    if not proc.stdout.strip():
        return None
    obj = json.loads(proc.stdout)
    if obj.get("kind") == "List" and not obj.get("items"):
        return None  # kubectl versions that print an empty List for an ignored NotFound
    return obj


def _print_data(data: Any, output: str) -> None:
    if output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, width=120), end="")
    else:
        print(json.dumps(data, indent=2))


def _cmd_status(args: argparse.Namespace) -> int:
    base = _kubectl_base(args)
    if base is None:
        return 1
    try:
        md = _kubectl(base, "get", MD_RESOURCE, args.name)
        pods = _kubectl(base, "get", "pods", "-l", f"{DEPLOYMENT_LABEL}={args.name}")["items"]
        events = _kubectl(
            base,
            "get",
            "events",
            "--field-selector",
            f"involvedObject.kind=ModelDeployment,involvedObject.name={args.name}",
        )["items"]
    except KubectlError as err:
        print(f"kubectl moe status: {err}", file=sys.stderr)
        return 1
    if args.output in ("json", "yaml"):
        _print_data({"modelDeployment": md, "pods": [asdict(pod_row(p)) for p in pods]}, args.output)
    else:
        sys.stdout.write(render_status(md, pods, events))
    return 0


# --- list -----------------------------------------------------------------------------------------


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


def _cmd_list(args: argparse.Namespace) -> int:
    base = _kubectl_base(args)
    if base is None:
        return 1
    scope = ["--all-namespaces"] if args.all_namespaces else []
    try:
        items = _kubectl(base, "get", MD_RESOURCE, *scope)["items"]
    except KubectlError as err:
        print(f"kubectl moe list: {err}", file=sys.stderr)
        return 1
    items.sort(key=lambda md: (md["metadata"].get("namespace", ""), md["metadata"]["name"]))
    if args.output in ("json", "yaml"):
        _print_data([deployment_summary(md) for md in items], args.output)
    elif not items:
        where = (
            "any namespace" if args.all_namespaces else f"namespace {args.namespace or '(the current one)'}"
        )
        print(f"No ModelDeployments found in {where}.", file=sys.stderr)
    else:
        sys.stdout.write(render_list(items, namespaces=args.all_namespaces, now=datetime.now(UTC)))
    return 0


# --- logs -----------------------------------------------------------------------------------------


class LogsError(RuntimeError):
    """Which pods to read cannot be told; the text is one line for the user."""


def group_indexes(pods: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Each pod's serving group, by pod name: LeaderWorkerSet's group index where a group spans pods;
    where each pod is a whole group (a Deployment), the pods in name order, 0, 1, ..."""
    out: dict[str, int] = {}
    singles = []
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        index = labels.get(LWS_GROUP_INDEX, "")
        if index.isdigit():
            out[pod["metadata"]["name"]] = int(index)
        else:
            singles.append(pod["metadata"]["name"])
    out.update({name: i for i, name in enumerate(sorted(singles))})
    return out


def _spans(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(a) if n == 1 else f"{a}-{a + n - 1}" for a, n in sorted(set(ranges)))


def select_log_pods(
    pods: Sequence[Mapping[str, Any]], *, role: str, group: int | None, rank: int | None
) -> list[Mapping[str, Any]]:
    """A role's pods narrowed to one group and/or the pod running one data-parallel rank (of its group);
    LogsError naming what there is when nothing matches."""
    groups = group_indexes(pods)
    chosen = list(pods)
    if group is not None:
        chosen = [p for p in chosen if groups[p["metadata"]["name"]] == group]
        if not chosen:
            known = ", ".join(map(str, sorted(set(groups.values()))))
            raise LogsError(f"no {role} group {group} (groups: {known})")
    if rank is not None:
        if role == ROUTER:
            raise LogsError("--rank applies to serving roles; the router has no ranks")
        spans = {p["metadata"]["name"]: rank_span(_argv(p), p["metadata"].get("labels")) for p in chosen}
        holding = [p for p in chosen if (s := spans[p["metadata"]["name"]]) and s[0] <= rank < s[0] + s[1]]
        if not holding:
            ranks = _spans([s for s in spans.values() if s])
            raise LogsError(f"no {role} pod runs rank {rank} (ranks per pod: {ranks or 'unknown'})")
        chosen = holding
    return sorted(chosen, key=lambda p: (groups[p["metadata"]["name"]], p["metadata"]["name"]))


def _matches(pod: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def logs_argv(
    base: Sequence[str],
    *,
    name: str,
    role: str,
    pods: Sequence[Mapping[str, Any]],
    chosen: Sequence[Mapping[str, Any]],
    follow: bool = False,
    tail: int = -1,
    previous: bool = False,
) -> list[str]:
    """The `kubectl logs` command line for the chosen pods: one pod by name, or several by a label
    selector (deployment, role, and LeaderWorkerSet's group and worker index where those narrow it),
    with each line prefixed by its pod. LogsError when no selector picks exactly the chosen pods."""
    container = ROUTER if role == ROUTER else CONTAINER
    flags = ["-c", container, f"--tail={tail}", *(["-f"] if follow else []), *(["-p"] if previous else [])]
    if len(chosen) == 1:
        return [*base, "logs", chosen[0]["metadata"]["name"], *flags]
    wanted = {p["metadata"]["name"] for p in chosen}

    def picks(selector: Mapping[str, str]) -> set[str]:
        return {p["metadata"]["name"] for p in pods if _matches(p, selector)}

    selector = {DEPLOYMENT_LABEL: name, ROLE_LABEL: role}
    for key in (LWS_GROUP_INDEX, LWS_WORKER_INDEX):
        if picks(selector) == wanted:
            break
        values = {(p["metadata"].get("labels") or {}).get(key) for p in chosen}
        if len(values) == 1 and (value := values.pop()) is not None:
            selector[key] = value
    if picks(selector) != wanted:
        raise LogsError(
            f"no label selector picks just {', '.join(sorted(wanted))}; name one group with --group"
        )
    text = ",".join(f"{k}={v}" for k, v in selector.items())
    return [*base, "logs", "-l", text, "--prefix", f"--max-log-requests={len(chosen)}", *flags]


def _cmd_logs(args: argparse.Namespace) -> int:
    base = _kubectl_base(args)
    if base is None:
        return 1
    try:
        if (args.group is not None and args.group < 0) or (args.rank is not None and args.rank < 0):
            raise LogsError("--group and --rank must be 0 or more")
        selector = f"{DEPLOYMENT_LABEL}={args.name},{ROLE_LABEL}={args.role}"
        pods = _kubectl(base, "get", "pods", "-l", selector)["items"]
        if not pods:
            if _get_optional(base, MD_RESOURCE, args.name) is None:
                where = f"namespace {args.namespace}" if args.namespace else "the current namespace"
                raise LogsError(f"ModelDeployment {args.name} not found in {where}")
            raise LogsError(f"ModelDeployment {args.name} has no {args.role} pods (yet)")
        chosen = select_log_pods(pods, role=args.role, group=args.group, rank=args.rank)
        argv = logs_argv(
            base,
            name=args.name,
            role=args.role,
            pods=pods,
            chosen=chosen,
            follow=args.follow,
            tail=args.tail,
            previous=args.previous,
        )
    except (KubectlError, LogsError) as err:
        print(f"kubectl moe logs: {err}", file=sys.stderr)
        return 1
    return subprocess.run(argv).returncode


def _cmd_experts(args: argparse.Namespace) -> int:
    try:
        if args.top < 0:
            raise ExpertsError(f"--top must be 0 or more, not {args.top}")
        if args.plot:
            from kubemoe_operator.cli.plot import require_matplotlib

            require_matplotlib()
        base = _kubectl_base(args)
        if base is None:
            return 1
        md = _get_optional(base, "modeldeployments.kubemoe.io", args.name)
        if md is None:
            where = f"namespace {args.namespace}" if args.namespace else "the current namespace"
            raise ExpertsError(f"ModelDeployment {args.name} not found in {where}")
        roles = select_roles(md, args.role)
        namespace = md["metadata"].get("namespace")
        scoped = [*base, "--namespace", namespace] if namespace and not args.namespace else base
        config_maps = {
            role: _get_optional(scoped, "configmaps", experts_configmap_name(args.name, role))
            for role in roles
        }
        report = build_report(md, config_maps, roles=roles, top=args.top)
        if args.plot:
            from kubemoe_operator.cli.plot import write_plot

            write_plot(report, Path(args.plot))
    except (ExpertsError, KubectlError) as err:
        print(f"kubectl moe experts: {err}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(report_data(report), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(report_data(report), sort_keys=False, width=120), end="")
    else:
        sys.stdout.write(render_experts(report))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _cluster_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    cmd.add_argument("--context", help="kubeconfig context")
    cmd.add_argument("--kubeconfig", help="kubeconfig file")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kubectl moe", description="Inspect kubemoe ModelDeployments.")
    add_version(root)
    sub = root.add_subparsers(dest="command", required=True)
    listing = sub.add_parser(
        "list", help="every ModelDeployment: model, readiness, phase, layout, ready groups, endpoint, age"
    )
    _cluster_flags(listing)
    listing.add_argument(
        "-A", "--all-namespaces", action="store_true", help="in every namespace (-n is then ignored)"
    )
    listing.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    listing.set_defaults(run=_cmd_list)
    status = sub.add_parser("status", help="roles, groups, ranks per pod, readiness, autoscaling, endpoint")
    status.add_argument("name", help="ModelDeployment name")
    _cluster_flags(status)
    status.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    status.set_defaults(run=_cmd_status)
    logs = sub.add_parser(
        "logs",
        help="the logs of a role's pods: one group, or the pod running one rank (kubectl logs)",
        description="The engine logs of a ModelDeployment's pods of one role, through `kubectl logs` with"
        " the pods' labels; several pods' lines are prefixed with the pod's name. A group is"
        " LeaderWorkerSet's group index where a group spans pods; where each pod is a whole group,"
        " groups are numbered in pod-name order.",
    )
    logs.add_argument("name", help="ModelDeployment name")
    logs.add_argument("--role", required=True, choices=LOG_ROLES, help="whose pods")
    logs.add_argument("--group", type=int, metavar="N", help="only serving group N (from 0)")
    logs.add_argument(
        "--rank", type=int, metavar="N", help="only the pod running data-parallel rank N (of each group)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="stream new lines (Ctrl-C stops)")
    logs.add_argument("--tail", type=int, default=-1, metavar="LINES", help="the last LINES lines only")
    logs.add_argument(
        "-p", "--previous", action="store_true", help="the previous container's logs (after a restart)"
    )
    _cluster_flags(logs)
    logs.set_defaults(run=_cmd_logs)
    experts = sub.add_parser(
        "experts",
        help="expert load per layer: imbalance now and at the last rebalance, the hottest experts and"
        " the ranks holding their copies; --plot draws heatmaps",
        description="Expert load of each expert-parallel role, from the ConfigMap NAME-ROLE-experts the"
        " operator's rebalance loop writes. Imbalance is the busiest rank's load over the mean rank load.",
    )
    experts.add_argument("name", help="ModelDeployment name")
    _cluster_flags(experts)
    experts.add_argument("--role", choices=ROLES, help="one role only (default: every expert-parallel role)")
    experts.add_argument(
        "--top",
        type=int,
        default=DEFAULT_TOP,
        metavar="K",
        help=f"hottest experts per layer (default {DEFAULT_TOP})",
    )
    experts.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw layer x expert load and layer x rank load before/after the last rebalance"
        " (needs matplotlib: pip install matplotlib)",
    )
    experts.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    experts.set_defaults(run=_cmd_experts)
    plan = sub.add_parser("plan", help="print the plan for a manifest (same as `kubemoe plan`)")
    plan.add_argument("file")
    plan.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    plan.set_defaults(run=lambda a: cli.main(["plan", a.file, "-o", a.output]))
    add_completion(sub, command="kubectl-moe", root=parser, hooks=COMPLETION_HOOKS)
    return root


# ModelDeployment names from the cluster, in the namespace given with -n/--namespace on the line.
_NAMES = (
    'compgen -W "$(ns=""; for ((j = 1; j < COMP_CWORD; j++)); do'
    ' case "${COMP_WORDS[j]}" in -n|--namespace) ns="${COMP_WORDS[j+1]}" ;; esac; done;'
    f' kubectl get {MD_RESOURCE} ${{ns:+--namespace "$ns"}}'
    ' -o jsonpath="{.items[*].metadata.name}" 2>/dev/null)" -- "$cur"'
)
COMPLETION_HOOKS = {"name": _NAMES, "file": FILES, "kubeconfig": FILES, "plot": FILES}
"""What the completion script offers for these arguments' values (cli/completion.py)."""


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("kubectl moe", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
