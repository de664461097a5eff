"""extraArgs cannot set a flag the plan owns under any spelling the engines' parsers accept, and a
user's `$(VAR)` reaches the engine literally instead of being expanded by the kubelet."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.engine_flags import ALIASES, PLAN_FLAGS, extra_args_problems, refusal
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.spec import RESERVED_FLAG_PATTERN
from kubemoe_operator.cli.kubemoe import main
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import BASE, REPO

UID = "00000000-0000-4000-8000-000000000000"

REFUSED = [
    "-tp",
    "-tp=4",
    "--tensor_parallel_size",
    "--tensor-parallel",
    "--tensor-parallel-size=4",
    "--config",
    "--config=flags.yaml",
    "--kv-transfer-config.kv_role=kv_both",
    "--kv_transfer_config.kv_connector",
    "-dp",
    "-dpl=2",
    "-dpa",
    "-ep",
    "-pp",
    "--pipeline-parallel-size=2",
    "--no-enable-expert-parallel",
    "--enable-expert",
    "--port=9000",
    "--po",
    "--served-model",
    "--host=::",
    "-n2",
    "-r",
    "--headless",
    "--model=other/model",
    "--role=router",
    "--engine",
    "--data-parallel-rank",
    "--",
    "---",
    "--=4",
]

ALLOWED = [
    "--enforce-eager",
    "--max-num-seqs=8",
    "--max-num-seqs",
    "8",
    "-1",
    "-",
    "-O3",
    "-q",
    "fp8",
    "--kv-cache-dtype=fp8",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--compilation-config.level=3",
    "--trust-remote-code",
    "--data-parallel-backend=ray",
    "--distributed-executor-backend",
    "--config-format=hf",
    "--speculative-config",
    "--load-format",
    "--tokenizer-mode",
    '{"port": 1}',
]


def spec_with(extra_args: list[str], **engine: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"]["engine"] = {**data["spec"]["engine"], "extraArgs": extra_args, **engine}
    return data


def normalized(message: str) -> str:
    return message.replace("_", "-").lower()


@pytest.mark.parametrize("arg", REFUSED)
def test_a_plan_owned_flag_is_refused_in_any_spelling(arg: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(spec_with(["--enforce-eager", arg]))
    [problem] = err.value.problems
    assert problem.field == "spec.engine.extraArgs[1]"
    assert repr(arg) in problem.message
    assert "roles.<role>.parallelism" in problem.fix


@pytest.mark.parametrize("arg", ALLOWED)
def test_other_flags_and_values_pass(arg: str) -> None:
    assert refusal(arg) is None
    parse_manifest(spec_with(["--enforce-eager", arg]))


SIZED = [
    ("--max-model-len=1048576", "spec.engine.maxModelLen"),
    ("--max-model-len", "spec.engine.maxModelLen"),
    ("--max_model_len", "spec.engine.maxModelLen"),
    ("--max-model", "spec.engine.maxModelLen"),
    ("--gpu-memory-utilization", "spec.engine.gpuMemoryUtilization"),
    ("--gpu-memory-utilization=0.98", "spec.engine.gpuMemoryUtilization"),
    ("--device-memory-utilization=0.98", "spec.engine.gpuMemoryUtilization"),
    ("--dtype=float32", "spec.model.config.dtype"),
    ("--dtype", "spec.model.config.dtype"),
]


@pytest.mark.parametrize("engine", ["vllm", "torch"])
@pytest.mark.parametrize(("arg", "field"), SIZED)
def test_the_flags_the_plan_sizes_memory_by_are_refused_naming_their_spec_field(
    arg: str, field: str, engine: str
) -> None:
    """argparse keeps the last --max-model-len (and --gpu-memory-utilization, --dtype): one in extraArgs
    would override what the plan sized the KV cache for; the runtime's torch engine takes the same flags."""
    [problem] = extra_args_problems(["--enforce-eager", arg], field="spec.engine.extraArgs", engine=engine)
    assert problem.field == "spec.engine.extraArgs[1]"
    assert repr(arg) in problem.message
    assert field in problem.message
    assert field in problem.fix
    assert problem.fix.startswith("remove it")


def test_a_sized_flag_in_a_manifest_is_refused() -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(spec_with(["--max-model-len=1048576", "--gpu-memory-utilization", "0.98"]))
    assert [p.field for p in err.value.problems] == ["spec.engine.extraArgs[0]", "spec.engine.extraArgs[1]"]
    assert "set spec.engine.maxModelLen" in err.value.problems[0].fix
    assert "set spec.engine.gpuMemoryUtilization" in err.value.problems[1].fix


@pytest.mark.parametrize(
    ("engine", "arg", "field"),
    [
        ("sglang", "--context-length=1000000", "spec.engine.maxModelLen"),
        ("sglang", "--mem-fraction-static=0.95", "spec.engine.gpuMemoryUtilization"),
        ("sglang", "--dtype=float32", "spec.model.config.dtype"),
        ("tgi", "--max-total-tokens=1000000", "spec.engine.maxModelLen"),
        ("tgi", "--cuda-memory-fraction=0.99", "spec.engine.gpuMemoryUtilization"),
        ("tgi", "--dtype=float16", "spec.model.config.dtype"),
    ],
)
def test_the_other_engines_memory_flags_name_their_spec_field(engine: str, arg: str, field: str) -> None:
    [problem] = extra_args_problems([arg], field="spec.engine.extraArgs", engine=engine)
    assert field in problem.fix


# -- the KV cache's size: flags that size it in place of the plan's share of device memory ---------------

KV_CACHE_SIZE = [
    ("vllm", "--kv-cache-memory-bytes=40G", "--kv-cache-memory-bytes"),
    ("vllm", "--kv-cache-memory-bytes", "--kv-cache-memory-bytes"),
    ("vllm", "--kv_cache_memory_bytes=42949672960", "--kv-cache-memory-bytes"),
    ("vllm", "--kv-cache-memory", "--kv-cache-memory-bytes"),  # argparse's unique prefix
    ("vllm", "--num-gpu-blocks-override=4096", "--num-gpu-blocks-override"),
    ("vllm", "--num-gpu-blocks-override", "--num-gpu-blocks-override"),
    ("vllm", "--num_gpu_blocks_override", "--num-gpu-blocks-override"),
    ("torch", "--kv-cache-memory-bytes=1G", "--kv-cache-memory-bytes"),
    ("torch", "--num-gpu-blocks-override=64", "--num-gpu-blocks-override"),
    ("sglang", "--max-total-tokens=200000", "--max-total-tokens"),
    ("sglang", "--max-total-tokens", "--max-total-tokens"),
]


@pytest.mark.parametrize(("engine", "arg", "flag"), KV_CACHE_SIZE)
def test_a_flag_that_sizes_the_kv_cache_is_refused_naming_the_field_and_the_fix(
    engine: str, arg: str, flag: str
) -> None:
    """vLLM's --kv-cache-memory-bytes and --num-gpu-blocks-override (and SGLang's --max-total-tokens) size
    the KV cache in place of --gpu-memory-utilization (--mem-fraction-static): the plan's KV tokens and
    max-length sequences per rank would not be the engine's."""
    [problem] = extra_args_problems(
        ["--enforce-eager", arg, "7"], field="spec.engine.extraArgs", engine=engine
    )
    assert problem.field == "spec.engine.extraArgs[1]"
    assert repr(arg) in problem.message
    assert flag in problem.message
    assert "spec.engine.gpuMemoryUtilization" in problem.message
    assert problem.fix.startswith("remove it")
    assert "spec.engine.gpuMemoryUtilization" in problem.fix
    assert "spec.engine.maxModelLen" in problem.fix


@pytest.mark.parametrize(
    "extra",
    [
        ["--kv-cache-memory-bytes=40G"],
        ["--kv-cache-memory-bytes", "40G"],
        ["--kv_cache_memory_bytes", "40G"],
        ["--num-gpu-blocks-override=4096"],
        ["--num-gpu-blocks-override", "4096"],
        ["--num_gpu_blocks_override=4096"],
    ],
)
def test_a_manifest_sizing_the_kv_cache_in_extra_args_is_refused(extra: list[str]) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(spec_with(["--enforce-eager", *extra]))
    [problem] = err.value.problems
    assert problem.field == "spec.engine.extraArgs[1]"
    assert "KV cache" in problem.message
    assert "set those instead" in problem.fix


def test_kubemoe_plan_refuses_a_kv_cache_size_flag_naming_the_field_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(spec_with(["--enforce-eager", "--num-gpu-blocks-override", "100000"])))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.engine.extraArgs[1]" in err
    assert "--num-gpu-blocks-override" in err
    assert "fix: remove it" in err


def test_the_tgi_max_total_tokens_is_still_its_longest_sequence() -> None:
    """TGI's --max-total-tokens is a request's longest sequence (spec.engine.maxModelLen), not a pool."""
    [problem] = extra_args_problems(["--max-total-tokens=9"], field="spec.engine.extraArgs", engine="tgi")
    assert (
        problem.fix
        == "remove it: set spec.engine.maxModelLen instead (the plan sizes each rank's KV cache for it)."
    )


@pytest.mark.parametrize(
    ("arg", "refused"),
    [
        ("--kv-cache-memory-bytes", True),
        ("--kv-cache-memory-bytes=40G", True),
        ("--kv_cache_memory_bytes=40G", True),
        ("--num-gpu-blocks-override", True),
        ("--num_gpu_blocks_override=4096", True),
        ("--tensor_parallel_size=4", True),
        ("--max_model_len", True),
        ("--kv-cache-dtype=fp8", False),
        ("--kv-cache-memory-bytesx", False),
        ("--enforce-eager", False),
        ("40G", False),
    ],
)
def test_the_crds_first_filter_refuses_the_kv_cache_size_flags_in_either_spelling(
    arg: str, refused: bool
) -> None:
    """The CEL rule's pattern (RE2; Python's re reads this one alike) at admission, before the operator."""
    assert bool(re.search(RESERVED_FLAG_PATTERN, arg)) is refused
    rules = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "engine"
    ]
    assert any(RESERVED_FLAG_PATTERN in r["rule"] for r in rules["x-kubernetes-validations"])


def test_the_message_names_the_flag_it_would_set() -> None:
    assert "--tensor-parallel-size" in (refusal("-tp=2") or "")
    assert "--nnodes" in (refusal("-n2") or "")
    assert "--kv-transfer-config" in (refusal("--kv-transfer-config.kv_role=x") or "")
    assert "reads flags from a file" in (refusal("--config") or "")


def test_every_vllm_spelling_of_a_plan_flag_is_refused() -> None:
    """vLLM's own parser: every option string (aliases, --no- forms) of a plan-owned flag is refused,
    and every short alias it has for one is in ALIASES."""
    from tests.engine_python import VLLM

    code = """
import json
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
print(json.dumps({a.dest: a.option_strings for a in parser._actions if a.option_strings}))
"""
    options: dict[str, list[str]] = json.loads(VLLM.run(code).strip().splitlines()[-1])
    assert {"kv_cache_memory_bytes", "num_gpu_blocks_override"} <= options.keys()  # still vLLM's names
    owned = {flag.replace("-", "_") for flag in PLAN_FLAGS}
    checked = 0
    for dest, strings in options.items():
        if dest not in owned:
            continue
        for option in strings:
            assert refusal(option) is not None, option
            assert refusal(f"{option}=1") is not None, option
            if not option.startswith("--"):
                assert ALIASES.get(option.lstrip("-")) == dest.replace("_", "-"), option
            checked += 1
    assert checked >= len(PLAN_FLAGS) - 3  # engine, role: the runtime's own; model: positional too


# -- the kubelet's $(VAR) expansion ------------------------------------------------------------------


def containers(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace="ns", uid=UID), image="i"
    )
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(objs)
    return found


def test_a_users_dollar_paren_reaches_the_engine_literally() -> None:
    """`$(HF_TOKEN)` in extraArgs would otherwise be expanded by the kubelet, e.g. into a secret."""
    data = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    data["spec"]["engine"]["extraArgs"] = ["--chat-template=$(HF_TOKEN)", "--x=$$(Y)", "--z=$"]
    data["spec"]["model"]["name"] = "org/$(HOME)"
    data["spec"]["model"]["source"] = "file:///models/$(HOME)"
    engine = [c for c in containers(data) if "--max-model-len" in c["args"]]
    assert engine
    for container in engine:
        args = container["args"]
        assert "--chat-template=$$(HF_TOKEN)" in args
        assert "--x=$$$$(Y)" in args  # the kubelet turns $$ into $: the process sees --x=$$(Y)
        assert "--z=$$" in args
        assert "org/$$(HOME)" in args
        assert "/models/$$(HOME)" in args
    routers = [c for c in containers(data) if c not in engine]
    assert routers
    assert all("org/$$(HOME)" in c["args"] for c in routers)


def test_the_operators_leader_address_is_still_expanded() -> None:
    data = copy.deepcopy(BASE)
    data["spec"]["roles"] = {
        "prefill": {"parallelism": {"data": 16}},
        "decode": {"parallelism": {"data": 16}},
    }
    args = [c["args"] for c in containers(data)]
    addresses = [a[a.index("--data-parallel-address") + 1] for a in args if "--data-parallel-address" in a]
    assert addresses
    assert set(addresses) == {"$(LWS_LEADER_ADDRESS)"}


@pytest.mark.parametrize(
    "extra",
    [
        ["--kv-offloading-size", "64"],
        ["--kv_offloading_size=64"],
        ["--kv-offloading-backend", "native"],
        ["--kv-offloading-b=lmcache"],
    ],
)
def test_kv_offloading_is_refused_where_it_would_replace_the_pd_connector(extra: list[str]) -> None:
    """vLLM 0.32 (VllmConfig._post_init_kv_transfer_config): with KV offloading on, its offloading connector
    and kv_role kv_both replace the operator's --kv-transfer-config, so prefill would hand decode nothing."""
    with pytest.raises(ManifestError) as err:
        parse_manifest(spec_with(["--enforce-eager", *extra]))
    [problem] = err.value.problems
    assert problem.field == "spec.engine.extraArgs[1]"
    assert "replaces the P/D connector" in problem.message
    assert "colocated" in problem.fix


def test_kv_offloading_is_the_users_choice_when_colocated() -> None:
    data = spec_with(["--kv-offloading-size", "64", "--kv-offloading-backend", "native"])
    data["spec"]["serving"] = {"mode": "colocated"}
    data["spec"]["roles"] = {"worker": {"parallelism": {"data": 2}}}
    (role,) = plan_manifest(parse_manifest(data)).roles
    assert "--kv-offloading-size" in role.pods[0].command
