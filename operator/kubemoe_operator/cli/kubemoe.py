"""`kubemoe`: the command line. `kubemoe plan FILE` (`-`: the manifest from stdin), `kubemoe crd`,
and local runs: `kubemoe up FILE`, `kubemoe status`, `kubemoe down` (local/); `kubemoe completion
bash|zsh`; `kubemoe --version`.
Errors are one line, never a traceback (cli/errors.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from kubemoe_operator.api.manifest import load_manifest, manifest_from_text, manifest_text
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.cli.completion import FILES, add_completion
from kubemoe_operator.cli.errors import add_version, run_main
from kubemoe_operator.cli.tables import render_table
from kubemoe_operator.gen.crd import crd_yaml
from kubemoe_operator.local.commands import RUNS_DIR, problem_lines
from kubemoe_operator.local.commands import add_commands as add_local_commands
from kubemoe_operator.plan.planner import plan_manifest

EXIT_INVALID = 2


STDIN = "-"
STDIN_NAME = "<stdin>"


def _cmd_plan(args: argparse.Namespace) -> int:
    stdin = args.file == STDIN
    path = Path(STDIN_NAME if stdin else args.file)
    if not stdin and not path.exists():
        print(f"kubemoe plan: {path}: no such file", file=sys.stderr)
        return EXIT_INVALID
    if not stdin and path.is_dir():
        print(f"kubemoe plan: {path}: is a directory (give the manifest file in it)", file=sys.stderr)
        return EXIT_INVALID
    try:
        if stdin:
            md = manifest_from_text(
                manifest_text(sys.stdin.buffer.read(), source=STDIN_NAME), source=STDIN_NAME
            )
        else:
            md = load_manifest(path)
        plan = plan_manifest(md)
    except ManifestError as err:
        print("\n".join(problem_lines(path, err)), file=sys.stderr)
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
    add_version(root)
    sub = root.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan", help="print the layout a ModelDeployment manifest would get, or why it cannot fit"
    )
    plan.add_argument("file", help="ModelDeployment manifest (YAML); - reads it from stdin")
    plan.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    plan.set_defaults(run=_cmd_plan)
    crd = sub.add_parser("crd", help="print the ModelDeployment CustomResourceDefinition")
    crd.set_defaults(run=_cmd_crd)
    add_local_commands(sub)
    add_completion(sub, command="kubemoe", root=parser, hooks=COMPLETION_HOOKS)
    return root


# The names `kubemoe down`/`status` take: the per-user index's runs (local/state.py index_dir, any
# directory) and this directory's .run/up/ (runs started without the index); each name once.
RUN_NAMES = (
    "d=${XDG_STATE_HOME:-}; [[ $d == /* ]] || d=$HOME/.local/state; "  # XDG: a relative one is ignored
    # `command ls`: not the user's alias (ls -F would complete `name@`)
    f'compgen -W "$({{ command ls "$d/kubemoe/up"; command ls {RUNS_DIR}; }} 2>/dev/null | sort -u)"'
    ' -- "$cur"'
)

# What the completion script offers for these arguments' values (cli/completion.py).
COMPLETION_HOOKS = {
    "file": FILES,
    "model": FILES,
    "run_dir": FILES,
    "name": RUN_NAMES,
}


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("kubemoe", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
