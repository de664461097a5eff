"""`kubemoe`: the command line. `kubemoe plan FILE`, `kubemoe crd`, and local runs: `kubemoe up FILE`,
`kubemoe status`, `kubemoe down` (local/)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.cli.tables import render_table
from kubemoe_operator.gen.crd import crd_yaml
from kubemoe_operator.local.commands import add_commands as add_local_commands
from kubemoe_operator.plan.planner import plan_manifest

EXIT_INVALID = 2


def _cmd_plan(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"kubemoe plan: {path}: no such file", file=sys.stderr)
        return EXIT_INVALID
    try:
        plan = plan_manifest(load_manifest(path))
    except ManifestError as err:
        count = len(err.problems)
        print(f"{path}: cannot plan ({count} problem{'s' if count != 1 else ''}):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem.field}: {problem.message}", file=sys.stderr)
            if problem.fix:
                print(f"    fix: {problem.fix}", file=sys.stderr)
        return EXIT_INVALID
    data = plan.model_dump(by_alias=True, mode="json")
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, width=120), end="")
    else:
        print(render_table(plan))
    return 0


def _cmd_crd(_args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="kubemoe", description="Deploy Mixture-of-Experts models on Kubernetes."
    )
    sub = root.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan", help="print the layout a ModelDeployment manifest would get, or why it cannot fit"
    )
    plan.add_argument("file", help="ModelDeployment manifest (YAML)")
    plan.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    plan.set_defaults(run=_cmd_plan)
    crd = sub.add_parser("crd", help="print the ModelDeployment CustomResourceDefinition")
    crd.set_defaults(run=_cmd_crd)
    add_local_commands(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
