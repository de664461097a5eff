"""spec.engine.extraArgs against the flags the plan owns, read the way the engines' parsers read them.

Both engines parse with argparse (vLLM's FlexibleArgumentParser; the runtime's `serve`, which reads
--engine, --role and --model itself), and argparse takes a flag under many spellings: a unique prefix
(`--tensor-parallel`), `=`-joined values, short aliases (`-tp`, `-dp`), a one-letter alias with its
value attached (`-n2`), and `--no-X` for a boolean; vLLM also takes `_` for `-` and `--X.field` for one
field of a JSON flag, and `--config FILE` reads more flags from a file. So each user flag is
normalised (dashes stripped, `_` -> `-`, cut at `=` and at the first `.`; `no-` dropped as a second
reading) and refused when it equals or is a prefix of a plan-owned flag or alias.

The aliases are vLLM's (`vllm.engine.arg_utils`); tests/operator/api/test_extra_args.py checks them
against the vLLM build when one is installed. The CEL twin in `spec.py` (RESERVED_FLAG_PATTERN) is
the apiserver's first, coarser filter; this is the complete check the operator and `kubemoe plan` run.
"""

from __future__ import annotations

from typing import Final

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import RESERVED_FLAGS

# Long flags the plan sets or that would contradict it (the CEL list, plus the rest of the layout, the
# runtime's own --engine/--role/--model, and the expert placement spec.experts sets: vLLM's EPLB, the
# torch engine's slots and placement file, render/experts.py), and --config, which could set any of them
# from a file.
PLAN_FLAGS: Final = (
    *RESERVED_FLAGS,
    "pipeline-parallel-size",
    "data-parallel-rank",
    "headless",
    "nnodes",
    "node-rank",
    "model",
    "engine",
    "role",
    "enable-eplb",
    "eplb-config",
    "redundant-experts",
    "expert-placement",
    "config",
)

# vLLM's short aliases of those flags -> the flag.
ALIASES: Final[dict[str, str]] = {
    "tp": "tensor-parallel-size",
    "pp": "pipeline-parallel-size",
    "dp": "data-parallel-size",
    "dpl": "data-parallel-size-local",
    "dpr": "data-parallel-start-rank",
    "dpa": "data-parallel-address",
    "dpp": "data-parallel-rpc-port",
    "dpn": "data-parallel-rank",
    "ep": "enable-expert-parallel",
    "n": "nnodes",
    "r": "node-rank",
}

# SGLang's server flags the plan sets (plan/command.py: sglang_command), with its own aliases; its parser is
# argparse (prefixes and `=` as above). `--config` reads flags from a YAML file.
SGLANG_PLAN_FLAGS: Final = (
    "model-path",
    "model",
    "served-model-name",
    "host",
    "port",
    "tp-size",
    "tensor-parallel-size",
    "dp-size",
    "data-parallel-size",
    "attn-dp-size",
    "attention-data-parallel-size",
    "enable-dp-attention",
    "ep-size",
    "expert-parallel-size",
    "ep",
    "pp-size",
    "pipeline-parallel-size",
    "nnodes",
    "node-rank",
    "dist-init-addr",
    "nccl-init-addr",
    "disaggregation-mode",
    "disaggregation-transfer-backend",
    "disaggregation-bootstrap-port",
    "context-length",
    "device",
    "config",
)
SGLANG_ALIASES: Final[dict[str, str]] = {"tp": "tp-size", "dp": "dp-size"}

# TGI's launcher (clap: exact long names, `=` values, and -p for --port) flags the plan sets
# (plan/command.py: tgi_command), and the ones that would split or move the shards.
TGI_PLAN_FLAGS: Final = (
    "model-id",
    "hostname",
    "port",
    "num-shard",
    "sharded",
    "max-input-tokens",
    "max-input-length",
    "max-total-tokens",
    "master-addr",
    "master-port",
    "shard-uds-path",
)
TGI_ALIASES: Final[dict[str, str]] = {"p": "port"}

FLAGS_BY_ENGINE: Final[dict[str, tuple[tuple[str, ...], dict[str, str]]]] = {
    "vllm": (PLAN_FLAGS, ALIASES),
    "torch": (PLAN_FLAGS, ALIASES),
    "sglang": (SGLANG_PLAN_FLAGS, SGLANG_ALIASES),
    "tgi": (TGI_PLAN_FLAGS, TGI_ALIASES),
}

FIX: Final = (
    "remove it: set roles.<role>.parallelism for the layout, spec.serving for KV transfer, "
    "spec.model for the model, spec.experts for redundant experts and their balancing; --config "
    "cannot be used (put its flags in extraArgs)."
)


def normalised(arg: str) -> str:
    """The flag name `arg` sets as the parsers read it: `--Tensor_parallel.x=4` -> `Tensor-parallel`."""
    return arg.lstrip("-").split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def _owned(name: str, engine: str = "vllm") -> str | None:
    """The plan-owned flag a normalised name equals or abbreviates (as itself or as an alias)."""
    flags, aliases = FLAGS_BY_ENGINE[engine]
    for flag in flags:
        if flag.startswith(name):
            return flag
    for alias, flag in aliases.items():
        if alias.startswith(name):
            return flag
    return None


def refusal(arg: str, engine: str = "vllm") -> str | None:
    """Why user argument `arg` may not reach `engine`; None when it may."""
    if not arg.startswith("-") or arg == "-":
        return None  # a value, or "-" (stdin), which argparse takes as a value
    if arg == "--":
        return "'--' ends option parsing: the arguments after it would reach the engine unparsed."
    name = normalised(arg)
    if not name:
        return f"{arg!r} names no flag."
    aliases = FLAGS_BY_ENGINE[engine][1]
    flag = None
    if not arg.startswith("--") and len(name) > 1 and name[0] in aliases:
        flag = aliases[name[0]]  # -n2: a one-letter alias with its value attached
    flag = (
        flag
        or _owned(name, engine)
        or (_owned(name.removeprefix("no-"), engine) if name.startswith("no-") else None)
    )
    if flag is None:
        return None
    if flag == "config":
        return f"{arg!r} reads flags from a file, which could set the flags the plan owns."
    return (
        f"{arg!r} would set --{flag}, which the plan owns (parallelism, ports, model, KV transfer,"
        " expert placement)."
    )


def extra_args_problems(extra_args: list[str], *, field: str, engine: str = "vllm") -> list[Problem]:
    """One Problem per user argument that would set a flag the plan owns for `engine`."""
    return [
        Problem(field=f"{field}[{i}]", message=message, fix=FIX)
        for i, arg in enumerate(extra_args)
        if (message := refusal(arg, engine)) is not None
    ]
