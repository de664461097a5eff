"""`kubectl moe`: a kubectl plugin (the executable `kubectl-moe`).

- `kubectl moe status NAME [-n NS]`: roles, groups, ranks per pod, readiness, the
  autoscaler's decisions and the endpoint of one ModelDeployment.
- `kubectl moe experts NAME [-n NS] [--role ROLE] [--top K] [--plot FILE.png]`: per expert-parallel
  role, each layer's imbalance (now, and before/predicted at the last rebalance) and its hottest
  experts with the ranks holding their copies (cli/experts.py; the heatmaps: cli/plot.py).
- `kubectl moe plan FILE [-o table|json|yaml]`: the same as `kubemoe plan`.

It reads the cluster through the real kubectl (the one that invoked it, found on PATH), so
contexts, kubeconfigs and credentials behave exactly as they do for kubectl itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.cli import kubemoe as cli
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

ROLE_LABEL = "kubemoe.io/role"
GROUP_LABEL = "kubemoe.io/group"
DEPLOYMENT_LABEL = "kubemoe.io/deployment"
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


def pod_ranks(argv: Sequence[str]) -> str:
    """The data-parallel ranks a pod runs, from the runtime command line the operator rendered."""
    local = _flag(argv, "--data-parallel-size-local")
    if local is None:
        return "0" if argv else "-"
    start = int(_flag(argv, "--data-parallel-start-rank") or 0)
    count = int(local)
    return str(start) if count == 1 else f"{start}-{start + count - 1}"


def pod_row(pod: dict[str, Any]) -> PodRow:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    labels = meta.get("labels", {})
    containers = spec.get("containers", [])
    argv = [*containers[0].get("command", []), *containers[0].get("args", [])] if containers else []
    statuses = status.get("containerStatuses", [])
    ready = sum(1 for c in statuses if c.get("ready"))
    phase = "Terminating" if meta.get("deletionTimestamp") else status.get("phase", "Unknown")
    return PodRow(
        role=labels.get(ROLE_LABEL, "?"),
        group=labels.get(GROUP_LABEL, "-"),
        name=meta["name"],
        node=spec.get("nodeName") or "<none>",
        ranks="-" if labels.get(ROLE_LABEL) == "router" else pod_ranks(argv),
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
        "",
    ]
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


def _kubectl(base: Sequence[str], *args: str) -> Any:
    proc = subprocess.run([*base, *args, "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KubectlError(proc.stderr.strip() or f"kubectl {' '.join(args)} failed")
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
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise KubectlError(lines[-1] if lines else f"kubectl get {resource} {name} failed")
    if not proc.stdout.strip():
        return None
    obj = json.loads(proc.stdout)
    if obj.get("kind") == "List" and not obj.get("items"):
        return None  # kubectl versions that print an empty List for an ignored NotFound
    return obj


def _cmd_status(args: argparse.Namespace) -> int:
    base = _kubectl_base(args)
    if base is None:
        return 1
    try:
        md = _kubectl(base, "get", "modeldeployments.kubemoe.io", args.name)
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
    if args.output == "json":
        print(json.dumps({"modelDeployment": md, "pods": [pod_row(p).__dict__ for p in pods]}, indent=2))
    else:
        sys.stdout.write(render_status(md, pods, events))
    return 0


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
    sub = root.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="roles, groups, ranks per pod, readiness, autoscaling, endpoint")
    status.add_argument("name", help="ModelDeployment name")
    _cluster_flags(status)
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    status.set_defaults(run=_cmd_status)
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
        " (needs matplotlib: pip install 'kubemoe-operator[plot]')",
    )
    experts.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    experts.set_defaults(run=_cmd_experts)
    plan = sub.add_parser("plan", help="print the plan for a manifest (same as `kubemoe plan`)")
    plan.add_argument("file")
    plan.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    plan.set_defaults(run=lambda a: cli.main(["plan", a.file, "-o", a.output]))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
