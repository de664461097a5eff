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
line (cli/errors.py). This module runs kubectl and the commands; what they show is worked out in pure
modules: the status and list tables in cli/moe_status.py, the pods `logs` reads in cli/moe_logs.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.labels import ROUTER
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
from kubemoe_operator.cli.moe_logs import LogsError, logs_argv, select_log_pods
from kubemoe_operator.cli.moe_status import (
    DEPLOYMENT_LABEL,
    ROLE_LABEL,
    deployment_summary,
    pod_row,
    render_list,
    render_status,
)
from kubemoe_operator.render.names import experts_configmap_name

LOG_ROLES = ("prefill", "decode", "worker", ROUTER)
MD_RESOURCE = "modeldeployments.kubemoe.io"


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
