"""The torch engine's KV cache in the plan: each rank allocates it up front, (--max-num-seqs + 1) x
(maxModelLen + 1) positions (the runtime's kv_budget.kv_cache_bytes; --max-num-seqs from engine.extraArgs,
else the runtime's default), so a layout fits only where what the weights leave holds all of it; the plan's
KV numbers are that cache's, and a layout it does not fit is refused naming maxModelLen with the fixes that
keep it (a shorter maxModelLen, a smaller --max-num-seqs), more memory, or a wider layout. The other
engines size their KV cache from the memory left, and keep needing one sequence of maxModelLen."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from kubemoe_operator.catalog.facts import GIB
from kubemoe_operator.cli.tables import render_table
from kubemoe_operator.plan.sizing import TORCH_MAX_NUM_SEQS, TorchKv, torch_kv
from tests.operator.helpers import planned, refused

KIB = 1024
# Qwen3-30B-A3B (48 layers, 4 KV heads of 128, bf16): 96 KiB of KV a position, 56.9 GiB of weights a rank
QWEN_POSITION = 48 * 2 * 4 * 128 * 2
MAX_LEN = 40960

# the report's manifest: Qwen3-30B-A3B on the torch engine, one rank in an 80Gi pod
SPEC: dict[str, Any] = {
    "apiVersion": "kubemoe.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "qwen-torch"},
    "spec": {
        "model": {"name": "Qwen/Qwen3-30B-A3B", "source": "pvc://models/Qwen3-30B-A3B"},
        "engine": {"kind": "torch", "maxModelLen": MAX_LEN},
        "accelerator": {"type": "cpu", "perPod": 1},
        "serving": {"mode": "colocated"},
        "roles": {
            "worker": {
                "replicas": 1,
                "parallelism": {"tensor": 1, "data": 1},
                "resources": {"requests": {"cpu": "8", "memory": "80Gi"}},
            }
        },
    },
}


def spec(
    *,
    memory: str = "80Gi",
    max_len: int = MAX_LEN,
    extra: list[str] | None = None,
    kind: str = "torch",
    parallelism: dict[str, int] | None = None,
) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["spec"]["engine"] = {"kind": kind, "maxModelLen": max_len, **({"extraArgs": extra} if extra else {})}
    worker = data["spec"]["roles"]["worker"]
    worker["resources"]["requests"]["memory"] = memory
    if parallelism is None:
        del worker["parallelism"]
    else:
        worker["parallelism"] = parallelism
    return data


def one_rank(**kw: Any) -> dict[str, Any]:
    return spec(parallelism={"tensor": 1, "data": 1}, **kw)


# -- the report's case: refused, naming the field, the bytes and the fixes ----------------------------


def test_a_cache_the_weights_leave_no_room_for_is_refused_naming_max_model_len() -> None:
    """80Gi x 0.9 - 0.25 GiB reserve - 56.9 GiB weights leaves 14.9 GiB; the runtime allocates
    17 x 40961 positions x 96 KiB = 63.75 GiB, and was planned as if 4 sequences fitted."""
    (problem,) = refused(one_rank())
    assert problem.field == "spec.engine.maxModelLen"
    assert "(16 + 1) x (40960 + 1) positions (--max-num-seqs 16, the runtime's default)" in problem.message
    cache = 17 * 40961 * QWEN_POSITION / GIB
    assert f"{cache:.2f} GiB, more than the 14.88 GiB KV budget per rank" in problem.message
    assert "run out of memory" in problem.message
    longest = int(re.search(r"set engine\.maxModelLen <= (\d+)", problem.fix).group(1))  # type: ignore[union-attr]
    assert "pass --max-num-seqs 2 (or fewer) in engine.extraArgs" in problem.fix
    assert "raise spec.roles.worker.resources.requests.memory (now 80Gi" in problem.fix
    assert "set parallelism {tensor: 1, data: 16} (EP16)" in problem.fix
    # each fix is exact: it plans, and one step past it is refused again
    planned(one_rank(max_len=longest))
    refused(one_rank(max_len=longest + 1))
    planned(one_rank(extra=["--max-num-seqs", "2"]))
    refused(one_rank(extra=["--max-num-seqs", "3"]))
    needed = float(re.search(r"needs about ([\d.]+) GiB a pod", problem.message).group(1))  # type: ignore[union-attr]
    assert needed == pytest.approx((56.9 + cache + 0.25) / 0.9, abs=0.1)
    planned(one_rank(memory=f"{int(needed) + 1}Gi"))
    refused(one_rank(memory=f"{int(needed) - 1}Gi"))
    ep16 = planned(spec(parallelism={"tensor": 1, "data": 16}))
    assert ep16.role("worker").expert == 16
    refused(spec(parallelism={"tensor": 1, "data": 8}))


def test_the_fit_is_the_runtimes_own_check() -> None:
    """The planner's cache is the bytes the runtime's kv_budget counts (and its default --max-num-seqs the
    runtime's), for a Qwen3-30B-A3B config."""
    from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
    from kubemoe_runtime.engines.torch.serve.kv_budget import kv_cache_bytes
    from kubemoe_runtime.pod.settings import parse_args

    settings, _ = parse_args(["--model", "m"])
    assert settings.max_num_seqs == TORCH_MAX_NUM_SEQS
    cfg = ModelConfig.from_dict(
        {
            "model_type": "qwen3_moe",
            "torch_dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "max_position_embeddings": 40960,
            "moe_intermediate_size": 768,
            "norm_topk_prob": True,
            "num_attention_heads": 32,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 48,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
            "vocab_size": 151936,
        }
    )
    fitting = planned(one_rank(memory="140Gi"))
    mem = fitting.role("worker").memory
    runtime = kv_cache_bytes(
        cfg, dtype="bfloat16", max_len=MAX_LEN, seqs=settings.max_num_seqs, local_ranks=1
    )
    assert TorchKv().positions(MAX_LEN) * mem.kv_bytes_per_token == runtime
    for seqs in (1, 2, 7):
        runtime = kv_cache_bytes(cfg, dtype="bfloat16", max_len=1000, seqs=seqs, local_ranks=1)
        assert TorchKv(max_num_seqs=seqs).positions(1000) * mem.kv_bytes_per_token == runtime


# -- a plan that fits says what the runtime allocates and serves ---------------------------------------


def test_a_fitting_plan_reports_the_cache_the_runtime_allocates() -> None:
    plan = planned(one_rank(memory="140Gi"))
    mem = plan.role("worker").memory
    assert mem.kv_bytes_per_token == QWEN_POSITION
    assert mem.sequences_at_max_len == 16  # a rank serves --max-num-seqs sequences, whatever is left
    assert mem.kv_tokens == 16 * MAX_LEN
    assert mem.kv_budget_gib == pytest.approx(140 * 0.9 - 0.25 - mem.weights_gib, abs=1e-3)  # the memory left
    (note,) = [n for n in plan.notes if "KV cache up front" in n]
    cache = 17 * 40961 * QWEN_POSITION / GIB
    assert note.startswith("worker: the torch engine allocates each rank's KV cache up front, (16 + 1) x")
    assert f"{cache:.1f} GiB of the {mem.kv_budget_gib:.1f} GiB KV budget" in note
    assert "16.0 x 40960" in render_table(plan)


def test_extra_args_max_num_seqs_sizes_the_cache() -> None:
    plan = planned(one_rank(extra=["--max-num-seqs=2"]))
    mem = plan.role("worker").memory
    assert (mem.sequences_at_max_len, mem.kv_tokens) == (2, 2 * MAX_LEN)
    assert any(
        "(2 + 1) x (40960 + 1) positions (--max-num-seqs 2, from engine.extraArgs)" in n for n in plan.notes
    )


@pytest.mark.parametrize(
    ("args", "seqs"),
    [
        (["--max-num-seqs", "8"], 8),
        (["--max-num-seqs=8"], 8),
        (["--max-num-seqs", "8", "--max-num-seqs", "4"], 4),  # argparse keeps the last
        (["--max-num-seq", "3"], 3),  # a prefix the runtime's argparse takes
        (["--max-num-seqs", "16"], 16),
        ([], None),
        (["--max-num-batched-tokens", "512"], None),
        (["--max-num-", "3"], None),  # ambiguous with --max-num-batched-tokens: not it
        (["--max-num-seqs", "zero"], None),  # the runtime refuses these as it starts
        (["--max-num-seqs", "0"], None),
        (["--max-num-seqs"], None),
    ],
)
def test_max_num_seqs_is_read_as_the_runtime_reads_it(args: list[str], seqs: int | None) -> None:
    kv = torch_kv(args)
    assert (kv.max_num_seqs, kv.given) == ((seqs, True) if seqs is not None else (TORCH_MAX_NUM_SEQS, False))


# -- suggestions size the same cache --------------------------------------------------------------------


def test_a_suggested_torch_layout_holds_its_cache_and_a_smaller_one_would_not() -> None:
    plan = planned(spec())
    role = plan.role("worker")
    assert role.suggested
    assert role.expert == 16  # the report's pods: EP1..EP8 leave less than 63.75 GiB for KV
    (note,) = [n for n in plan.notes if "parallelism suggested" in n]
    assert "(16 + 1) x (40960 + 1) positions per rank" in note
    assert "4 sequences" not in note
    refused(spec(parallelism={"tensor": 1, "data": 8}))
    # with a cache that fits one rank, one rank is what is suggested
    small = planned(spec(memory="140Gi"))
    assert small.role("worker").expert == 1


def test_redundant_slots_that_squeeze_the_cache_out_are_refused_with_the_cache_in_the_message() -> None:
    data = spec(max_len=8192, parallelism={"tensor": 1, "data": 2})
    data["spec"]["experts"] = {"redundant": 2}
    planned(data)
    data["spec"]["experts"] = {"redundant": 16}
    (problem,) = refused(data)
    assert problem.field == "spec.experts.redundant"
    assert "leave 8.13 GiB for KV, less than the 12.75 GiB KV cache the torch engine allocates up front" in (
        problem.message
    )
    assert "((16 + 1) x (8192 + 1) positions; --max-num-seqs 16, the runtime's default)" in problem.message


# -- the other engines: unchanged ------------------------------------------------------------------------


def test_vllm_keeps_sizing_its_kv_from_the_budget() -> None:
    plan = planned(one_rank(kind="vllm"))  # the same pod on vLLM's CPU build: one sequence fits
    mem = plan.role("worker").memory
    assert mem.kv_tokens == pytest.approx(mem.kv_budget_gib * GIB / mem.kv_bytes_per_token, abs=2)
    assert mem.sequences_at_max_len == pytest.approx(
        3.7, abs=0.01
    )  # past vLLM's process (VLLM_CPU_PROCESS_GIB)
    assert not any("KV cache up front" in n for n in plan.notes)
