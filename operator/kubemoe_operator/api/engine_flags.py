"""spec.engine.extraArgs against the flags the plan owns, read the way the engines' parsers read them.

Both engines parse with argparse (vLLM's FlexibleArgumentParser; the runtime's `serve`, which reads
--engine, --role and --model itself), and argparse takes a flag under many spellings: a unique prefix
(`--tensor-parallel`), `=`-joined values, short aliases (`-tp`, `-dp`), a one-letter alias with its
value attached (`-n2`), and `--no-X` for a boolean; vLLM also takes `_` for `-` and `--X.field` for one
field of a JSON flag, and `--config FILE` reads more flags from a file. So each user flag is
normalised (dashes stripped, `_` -> `-`, cut at `=` and at the first `.`; `no-` dropped as a second
reading) and refused when it equals or is a prefix of a plan-owned flag or alias.

The flags the plan sizes memory by (the longest sequence, the share of device memory, the dtype) are
plan-owned too: argparse keeps the last occurrence, so one in extraArgs would override the value the
plan sized the KV cache for; their refusal names the spec field that sets them (SIZED_BY). So are the
flags that size the KV cache in place of the share of device memory (KV_CACHE_SIZE_FLAGS: vLLM's
--kv-cache-memory-bytes and --num-gpu-blocks-override, SGLang's --max-total-tokens): with one, the KV
tokens and max-length sequences per rank the plan reports would not be the engine's (vLLM's two ignore
--gpu-memory-utilization, so the KV cache could also outgrow the memory the plan left for it).

The aliases are vLLM's (`vllm.engine.arg_utils`); tests/operator/api/test_extra_args.py checks them
against the vLLM build when one is installed. The CEL twin in `spec.py` (RESERVED_FLAG_PATTERN) is
the apiserver's first, coarser filter; this is the complete check the operator and `kubemoe plan` run.
"""

from __future__ import annotations

from typing import Final

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import RESERVED_FLAGS

# Long flags the plan sets or that would contradict it (the CEL list, with the KV cache's size, plus the
# rest of the layout, the runtime's own --engine/--role/--model, the expert placement spec.experts sets:
# vLLM's EPLB, the torch engine's slots and placement file, render/experts.py; and the memory sizing: the
# runtime's pod/settings.py takes the same three flags), and --config, which could set any of them from
# a file.
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
    "max-model-len",
    "gpu-memory-utilization",
    "device-memory-utilization",  # vLLM's other name for --gpu-memory-utilization
    "dtype",
    "config",
)

# The flags the plan sizes each rank's memory by, per engine, -> the spec field the plan sets them from.
MAX_MODEL_LEN_FIELD: Final = "spec.engine.maxModelLen"
UTILIZATION_FIELD: Final = "spec.engine.gpuMemoryUtilization"
DTYPE_FIELD: Final = "spec.model.config.dtype"
SIZED_BY: Final[dict[str, str]] = {
    "max-model-len": MAX_MODEL_LEN_FIELD,
    "context-length": MAX_MODEL_LEN_FIELD,  # SGLang
    "max-total-tokens": MAX_MODEL_LEN_FIELD,  # TGI (with max-input-tokens below it)
    "max-input-tokens": MAX_MODEL_LEN_FIELD,
    "max-input-length": MAX_MODEL_LEN_FIELD,
    "gpu-memory-utilization": UTILIZATION_FIELD,
    "device-memory-utilization": UTILIZATION_FIELD,
    "mem-fraction-static": UTILIZATION_FIELD,  # SGLang
    "cuda-memory-fraction": UTILIZATION_FIELD,  # TGI
    "dtype": DTYPE_FIELD,
}

# Per engine, the flags that size the KV cache in place of the plan's share of device memory: vLLM's bytes
# for the KV cache and its block count (both override --gpu-memory-utilization's sizing), SGLang's token
# count of its KV pool. TGI's launcher has none that the plan leaves unset.
KV_CACHE_SIZE_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "vllm": ("kv-cache-memory-bytes", "num-gpu-blocks-override"),
    "torch": ("kv-cache-memory-bytes", "num-gpu-blocks-override"),  # PLAN_FLAGS serves both: vLLM's names
    "sglang": ("max-total-tokens",),
    "tgi": (),
}

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
    "mem-fraction-static",
    "max-total-tokens",
    "dtype",
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
    "cuda-memory-fraction",
    "dtype",
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
KV_CACHE_SIZE_FIX: Final = (
    f"remove it: the plan gives each rank's KV cache what the engine's share of device memory"
    f" ({UTILIZATION_FIELD}) leaves after the weights, for sequences up to {MAX_MODEL_LEN_FIELD}; set"
    " those instead (`kubemoe plan` shows the KV tokens and max-length sequences per rank they give)."
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


def _sized_fix(flag: str) -> str:
    field = SIZED_BY[flag]
    if field == DTYPE_FIELD:
        return (
            f"remove it: the plan passes the model's dtype ({field}, from the catalog or the model's"
            " config) and sizes the KV cache by it; set that instead."
        )
    return f"remove it: set {field} instead (the plan sizes each rank's KV cache for it)."


def refused(arg: str, engine: str = "vllm") -> tuple[str, str] | None:
    """Why user argument `arg` may not reach `engine`, and the fix; None when it may."""
    if not arg.startswith("-") or arg == "-":
        return None  # a value, or "-" (stdin), which argparse takes as a value
    if arg == "--":
        return "'--' ends option parsing: the arguments after it would reach the engine unparsed.", FIX
    name = normalised(arg)
    if not name:
        return f"{arg!r} names no flag.", FIX
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
        return f"{arg!r} reads flags from a file, which could set the flags the plan owns.", FIX
    if flag in KV_CACHE_SIZE_FLAGS[engine]:
        return (
            f"{arg!r} would set --{flag}, which sizes the KV cache in place of the share of device memory"
            f" the plan sizes it by ({UTILIZATION_FIELD}): the KV tokens and max-length sequences per rank"
            " the plan reports would not be the engine's.",
            KV_CACHE_SIZE_FIX,
        )
    if flag in SIZED_BY:
        return (
            f"{arg!r} would set --{flag}, which the plan sets from {SIZED_BY[flag]} and sizes each rank's"
            " memory by (the plan's own would be overridden).",
            _sized_fix(flag),
        )
    return (
        f"{arg!r} would set --{flag}, which the plan owns (parallelism, ports, model, KV transfer,"
        " expert placement).",
        FIX,
    )


def refusal(arg: str, engine: str = "vllm") -> str | None:
    """Why user argument `arg` may not reach `engine`; None when it may."""
    why = refused(arg, engine)
    return None if why is None else why[0]


def extra_args_problems(extra_args: list[str], *, field: str, engine: str = "vllm") -> list[Problem]:
    """One Problem per user argument that would set a flag the plan owns for `engine`."""
    return [
        Problem(field=f"{field}[{i}]", message=message, fix=fix)
        for i, arg in enumerate(extra_args)
        if (why := refused(arg, engine)) is not None
        for message, fix in [why]
    ]


# vLLM's KV offloading flags: set, vLLM replaces --kv-transfer-config's connector with its offloading one
# and the role with kv_both (VllmConfig._post_init_kv_transfer_config), so in P/D the prefill's KV would
# never reach the decode; colocated, offloading is the user's to choose.
OFFLOADING_FLAGS: Final = ("kv-offloading-size", "kv-offloading-backend")


def offloading_problems(
    extra_args: list[str], *, field: str, engine: str, disaggregated: bool
) -> list[Problem]:
    """One Problem per vLLM KV-offloading flag in a disaggregated deployment's extraArgs (a unique
    abbreviation counts, as vLLM's parser takes one)."""
    if engine != "vllm" or not disaggregated:
        return []
    return [
        Problem(
            field=f"{field}[{i}]",
            message=f"{arg!r} turns on vLLM's KV offloading, which replaces the P/D connector"
            " (serving.kvTransfer.connector) with its own and makes each pod kv_both: the prefill's"
            " KV would never reach the decode.",
            fix="remove it in disaggregated mode (offloading works in serving.mode: colocated).",
        )
        for i, arg in enumerate(extra_args)
        if arg.startswith("--")
        and len(name := normalised(arg)) >= len("kv-off")
        and any(f.startswith(name) for f in OFFLOADING_FLAGS)
    ]
