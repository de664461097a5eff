"""A sliding-window attention layer keeps at most `slidingWindow` tokens of a sequence (vLLM's hybrid KV
cache), so gpt-oss, half of whose 36 layers slide over 128 tokens, costs about half the KV per token of
a model whose every layer keeps every token. Counted as full layers, gpt-oss-120b at its 131072-token
context was refused on one H100, where vLLM serves it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.catalog import load_catalog, resolve_model
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import BASE

GPT_OSS = {"name": "openai/gpt-oss-120b", "source": "hf://openai/gpt-oss-120b"}


def one_h100(**engine: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(
        model=GPT_OSS,
        engine=engine,
        accelerator={"type": "H100", "perPod": 1},
        serving={"mode": "colocated"},
        roles={"worker": {"parallelism": {"tensor": 1, "data": 1, "expert": 1}}},
    )
    return data


def test_gpt_oss_at_its_whole_context_fits_one_h100() -> None:
    plan = plan_manifest(parse_manifest(one_h100()))
    (role,) = plan.roles
    assert role.memory.max_model_len == 131072
    assert role.memory.kv_tokens >= 131072


def test_sliding_layers_cost_their_window_not_the_sequence() -> None:
    model = resolve_model(parse_manifest(one_h100()).spec.model, load_catalog())
    assert (model.sliding_window, model.sliding_window_layers) == (128, 18)
    full_layer = 2 * model.num_key_value_heads * model.head_dim * 2  # K and V, bf16
    assert model.kv_bytes_per_token(tensor=1, max_len=128) == 36 * full_layer  # within the window
    assert model.kv_bytes_per_token(tensor=1) == 36 * full_layer  # no length: counted in full
    long = model.kv_bytes_per_token(tensor=1, max_len=131072)
    assert long == pytest.approx((18 + 18 * 128 / 131072) * full_layer)


def test_more_sliding_layers_than_layers_is_refused_naming_the_field() -> None:
    data = one_h100()
    data["spec"]["model"]["config"] = {"slidingWindowLayers": 40}
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    (problem,) = err.value.problems
    assert problem.field == "spec.model.config.slidingWindowLayers"
    assert "40 sliding-window layers but only 36 layers" in problem.message
