"""Golden plans for every example. Regenerate with UPDATE_GOLDEN=1 after an intended change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import EXAMPLES, GOLDEN


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"tiny-moe", "deepseek-v3", "qwen3-235b", "mixtral-8x7b"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_plan_matches_golden(path: Path) -> None:
    data = plan_manifest(load_manifest(path)).model_dump(by_alias=True, mode="json")
    golden = GOLDEN / f"{path.stem}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(json.dumps(data, indent=2) + "\n")
    assert data == json.loads(golden.read_text())


def test_deepseek_v3_is_llm_d_wide_ep() -> None:
    """llm-d's wide-EP guide: DeepSeek-R1 with DP=16 per role over two nodes of 8 GPUs."""
    plan = plan_manifest(load_manifest(next(p for p in EXAMPLES if p.stem == "deepseek-v3")))
    assert plan.layout == "P1x(EP16) D1x(EP16)"
    assert plan.devices == 32
    for role in plan.roles:
        assert (role.data, role.tensor, role.expert, role.pods_per_group, role.devices_per_pod) == (
            16,
            1,
            16,
            2,
            8,
        )
        assert role.workload == "LeaderWorkerSet"
        assert role.experts_per_rank == 16
        assert 50 < role.memory.weights_gib < 60
        assert role.memory.kv_tokens > 1_000_000


def test_tiny_example_is_ep1_prefill_ep2_decode_on_cpu() -> None:
    plan = plan_manifest(load_manifest(next(p for p in EXAMPLES if p.stem == "tiny-moe")))
    assert plan.layout == "P1x(EP1) D1x(EP2)"
    assert plan.resource is None
    assert plan.role("decode").experts_per_rank == 4
