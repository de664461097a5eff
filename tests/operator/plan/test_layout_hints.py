"""The fix for a layout that does not fit names the smallest layout that passes the check it failed
(weights and KV for one sequence of maxModelLen), and, where a shorter maxModelLen would keep the given
layout, that length. It reused the suggestion for a role without parallelism, which wants KV for
SUGGEST_HEADROOM_SEQUENCES sequences: DeepSeek-V3 on H100 with {tensor: 8} was told to use EP128 where
EP16 plans."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import SUGGEST_HEADROOM_SEQUENCES, plan_manifest
from kubemoe_operator.plan.sizing import divisors, layout_ok

DEEPSEEK = "deepseek-ai/DeepSeek-V3"
KIMI = "moonshotai/Kimi-K2-Instruct"
QWEN_235B = "Qwen/Qwen3-235B-A22B"
MIXTRAL_8X22B = "mistralai/Mixtral-8x22B-Instruct-v0.1"
EXPERTS = {DEEPSEEK: 256, KIMI: 384, QWEN_235B: 128, MIXTRAL_8X22B: 8}
TGI = {"kind": "tgi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.4"}


def manifest(
    model: str, parallelism: dict[str, int] | None, *, gpu: str = "H100", engine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One colocated worker role of `model` on 8-GPU pods of `gpu` (maxModelLen: the model's context)."""
    worker: dict[str, Any] = {"replicas": 1}
    if parallelism is not None:
        worker["parallelism"] = parallelism
    return {
        "apiVersion": "kubemoe.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "t"},
        "spec": {
            "model": {"name": model, "source": f"hf://{model}"},
            "engine": engine or {},
            "serving": {"mode": "colocated"},
            "accelerator": {"type": gpu, "perPod": 8},
            "roles": {"worker": worker},
        },
    }


def planned(data: dict[str, Any]) -> Plan:
    return plan_manifest(parse_manifest(data))


def refused(data: dict[str, Any]) -> Problem:
    with pytest.raises(ManifestError) as err:
        planned(data)
    (problem,) = err.value.problems
    return problem


def suggested_ep(fix: str) -> int:
    match = re.search(r"set parallelism \{tensor: 1, data: (\d+)\} \(EP(\d+)\)", fix)
    assert match is not None, fix
    assert match[1] == match[2]
    return int(match[1])


@pytest.mark.parametrize(
    ("model", "gpu", "parallelism", "field", "ep"),
    [
        (DEEPSEEK, "H100", {"tensor": 8}, "spec.roles.worker.parallelism", 16),
        (DEEPSEEK, "H100", {"tensor": 2, "data": 4}, "spec.roles.worker.parallelism", 16),
        (DEEPSEEK, "L40S", {"data": 16}, "spec.roles.worker.parallelism", 64),
        (KIMI, "H100", {"data": 16}, "spec.roles.worker.parallelism", 24),
        (QWEN_235B, "H100", {"data": 8}, "spec.engine.maxModelLen", 16),
        (KIMI, "H200", {"tensor": 8}, "spec.engine.maxModelLen", 16),
    ],
)
def test_the_fix_names_the_smallest_ep_that_plans(
    model: str, gpu: str, parallelism: dict[str, int], field: str, ep: int
) -> None:
    problem = refused(manifest(model, parallelism, gpu=gpu))
    assert problem.field == field
    assert suggested_ep(problem.fix) == ep
    role = planned(manifest(model, {"tensor": 1, "data": ep}, gpu=gpu)).role("worker")
    assert role.memory.sequences_at_max_len >= 1
    smaller = [e for e in divisors(EXPERTS[model]) if e < ep and layout_ok(e, 8)]
    with pytest.raises(ManifestError):  # the next smaller EP a group can have does not fit
        planned(manifest(model, {"tensor": 1, "data": smaller[-1]}, gpu=gpu))


def test_deepseek_v3_on_h100_is_told_ep16_not_the_headroom_suggestion() -> None:
    fix = refused(manifest(DEEPSEEK, {"tensor": 8})).fix
    assert "EP128" not in fix
    # a role without parallelism still gets the suggestion with headroom, as before
    role = planned(manifest(DEEPSEEK, None)).role("worker")
    assert role.suggested
    assert role.expert == 128
    assert role.memory.sequences_at_max_len >= SUGGEST_HEADROOM_SEQUENCES


@pytest.mark.parametrize(
    ("model", "gpu", "parallelism"),
    [
        (QWEN_235B, "H100", {"data": 8}),
        (KIMI, "H200", {"tensor": 8}),
        (MIXTRAL_8X22B, "L40S", {"tensor": 2, "data": 4}),
    ],
)
def test_a_kv_shortfall_offers_the_max_model_len_that_keeps_the_layout(
    model: str, gpu: str, parallelism: dict[str, int]
) -> None:
    problem = refused(manifest(model, parallelism, gpu=gpu))
    assert problem.field == "spec.engine.maxModelLen"
    match = re.search(r"set engine.maxModelLen <= (\d+) to keep this layout", problem.fix)
    assert match is not None, problem.fix
    role = planned(manifest(model, parallelism, gpu=gpu, engine={"maxModelLen": int(match[1])})).role(
        "worker"
    )
    assert (role.tensor, role.data) == (parallelism.get("tensor", 1), parallelism.get("data", 1))


def test_weights_that_do_not_fit_do_not_offer_a_shorter_max_model_len() -> None:
    """KV is what a shorter maxModelLen frees; weights stay as large."""
    problem = refused(manifest(DEEPSEEK, {"tensor": 8}))
    assert "weights need" in problem.message
    assert "maxModelLen" not in problem.fix


def test_an_engine_without_expert_parallelism_is_told_the_tensor_size_that_plans() -> None:
    mixtral_8x7b = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    problem = refused(manifest(mixtral_8x7b, {"tensor": 1}, gpu="L40S", engine=TGI))
    assert "set parallelism {tensor: 4}" in problem.fix
    role = planned(manifest(mixtral_8x7b, {"tensor": 4}, gpu="L40S", engine=TGI)).role("worker")
    assert role.tensor == 4
    with pytest.raises(ManifestError):
        planned(manifest(mixtral_8x7b, {"tensor": 2}, gpu="L40S", engine=TGI))
