"""Every planner error names the field at fault and says how to fix it."""

from __future__ import annotations

from typing import Any

import pytest

from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import manifest


def _problems(**spec: Any) -> list[Problem]:
    with pytest.raises(ManifestError) as err:
        plan_manifest(manifest(**spec))
    problems = err.value.problems
    assert problems
    for p in problems:
        assert p.field.startswith("spec.")
        assert p.fix
    return problems


def _one(**spec: Any) -> Problem:
    (problem,) = _problems(**spec)
    return problem


def test_ep_must_divide_routed_experts() -> None:
    p = _one(
        roles={"prefill": {"parallelism": {"data": 12}}, "decode": {"parallelism": {"data": 4}}},
        accelerator={"type": "H100", "perPod": 4},
    )
    assert p.field == "spec.roles.prefill.parallelism.data"
    assert "does not divide the 128 routed experts" in p.message
    assert "16" in p.fix


def test_ep_error_names_expert_when_given() -> None:
    p = _one(
        roles={
            "prefill": {"parallelism": {"data": 3, "expert": 3}},
            "decode": {"parallelism": {"data": 3, "expert": 1}},
        },
        accelerator={"type": "H200", "perPod": 3},
    )
    assert p.field == "spec.roles.prefill.parallelism.expert"


def test_tp_must_divide_attention_heads() -> None:
    problems = _problems(
        roles={"prefill": {"parallelism": {"tensor": 3}}, "decode": {"parallelism": {"data": 4}}},
    )
    assert problems[0].field == "spec.roles.prefill.parallelism.tensor"
    assert "32 attention heads" in problems[0].message


def test_tp_must_divide_or_cover_kv_heads() -> None:
    config = {
        "numLayers": 2,
        "hiddenSize": 96,
        "numAttentionHeads": 24,
        "numKeyValueHeads": 8,
        "numRoutedExperts": 6,
        "expertsPerToken": 2,
        "moeIntermediateSize": 32,
        "vocabSize": 128,
        "maxPositionEmbeddings": 8192,  # BASE's maxModelLen (a longer one is refused first)
    }
    p = _one(
        model={"name": "acme/odd", "source": "hf://acme/odd", "config": config},
        accelerator={"type": "H100", "perPod": 6},
        roles={
            "prefill": {"parallelism": {"tensor": 6, "expert": 1}},
            "decode": {"parallelism": {"data": 2}},
        },
    )
    assert p.field == "spec.roles.prefill.parallelism.tensor"
    assert "8 KV heads" in p.message


def test_tp_must_fit_in_a_pod() -> None:
    problems = _problems(
        accelerator={"type": "H100", "perPod": 4},
        roles={"prefill": {"parallelism": {"tensor": 8}}, "decode": {"parallelism": {"data": 4}}},
    )
    assert any(
        p.field == "spec.roles.prefill.parallelism.tensor" and "one pod" in p.message for p in problems
    )


def test_ranks_must_be_a_multiple_of_gpus_per_pod() -> None:
    problem = _one(
        accelerator={"type": "H100", "perPod": 8},
        roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"parallelism": {"data": 12, "expert": 1}}},
    )
    assert problem.field == "spec.roles.decode.parallelism.data"
    assert "multiple of accelerator.perPod=8" in problem.message
    assert "8" in problem.fix
    assert "16" in problem.fix


def test_weights_that_do_not_fit_suggest_a_larger_ep() -> None:
    p = _one(
        model={"name": "deepseek-ai/DeepSeek-V3", "source": "hf://deepseek-ai/DeepSeek-V3"},
        roles={"prefill": {"parallelism": {"data": 16}}, "decode": {"parallelism": {"data": 4}}},
    )
    assert p.field == "spec.roles.decode.parallelism"
    assert "weights need" in p.message
    assert "H100" in p.message
    assert "{tensor: 1, data: 16} (EP16)" in p.fix  # the smallest EP that fits, with KV headroom


def test_kv_budget_below_one_sequence() -> None:
    problems = _problems(
        model={"name": "Llama-4-Scout", "source": "hf://meta-llama/Llama-4-Scout-17B-16E-Instruct"},
        engine={},
        roles={"prefill": {"parallelism": {"data": 16}}, "decode": {"parallelism": {"data": 16}}},
    )
    assert {p.field for p in problems} == {"spec.engine.maxModelLen"}
    assert "10485760" in problems[0].message
    assert "engine.maxModelLen <=" in problems[0].fix


def test_unknown_model_without_inline_facts() -> None:
    p = _one(model={"name": "acme/secret-moe", "source": "hf://acme/secret-moe"})
    assert p.field == "spec.model.name"
    assert "not in the model catalog" in p.message
    assert "spec.model.config" in p.fix


def test_unknown_gpu_type() -> None:
    p = _one(accelerator={"type": "TPU-v5", "perPod": 8})
    assert p.field == "spec.accelerator.type"
    assert "H200" in p.fix
    assert "memoryGiB" in p.fix


def test_unknown_model_and_gpu_are_both_reported() -> None:
    problems = _problems(model={"name": "acme/x", "source": "hf://acme/x"}, accelerator={"type": "TPU-v5"})
    assert {p.field for p in problems} == {"spec.model.name", "spec.accelerator.type"}


def test_cpu_needs_a_memory_request() -> None:
    one_rank = {"parallelism": {"data": 1}}  # vLLM's CPU build runs no data parallelism
    problems = _problems(
        accelerator={"type": "cpu", "perPod": 1}, roles={"prefill": one_rank, "decode": one_rank}
    )
    assert {p.field for p in problems} == {
        "spec.roles.prefill.resources.requests.memory",
        "spec.roles.decode.resources.requests.memory",
    }


def test_every_role_is_checked_before_failing() -> None:
    problems = _problems(
        roles={"prefill": {"parallelism": {"tensor": 3}}, "decode": {"parallelism": {"data": 12}}}
    )
    fields = {p.field for p in problems}
    assert "spec.roles.prefill.parallelism.tensor" in fields
    assert "spec.roles.decode.parallelism.data" in fields


def test_omitted_parallelism_gets_the_smallest_ep_that_fits() -> None:
    plan = plan_manifest(
        manifest(
            model={"name": "deepseek-ai/DeepSeek-V3", "source": "hf://deepseek-ai/DeepSeek-V3"},
            accelerator={"type": "H200", "perPod": 8},
            engine={"maxModelLen": 163840},
            roles={"prefill": {}, "decode": {}},
        )
    )
    decode = plan.role("decode")
    assert decode.suggested
    assert (decode.data, decode.expert) == (16, 16)  # EP8 holds < 4 sequences of 163840 tokens
    assert decode.memory.sequences_at_max_len >= 4
    assert any("suggested" in n for n in plan.notes)


def test_no_ep_fits_is_an_error() -> None:
    p = _problems(
        model={"name": "Kimi-K2", "source": "hf://moonshotai/Kimi-K2-Instruct"},
        accelerator={"type": "L40S", "perPod": 8},
        engine={"maxModelLen": 131072},
        roles={"prefill": {}, "decode": {"parallelism": {"data": 384}}},
    )
    assert p[0].field == "spec.roles.prefill.parallelism"
    assert "no expert-parallel size" in p[0].message
