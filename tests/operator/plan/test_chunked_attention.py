"""Llama 4's chunked local attention: 36 of its 48 layers attend within chunks of attention_chunk_size
(8192) tokens, and every 4th is a global NoPE layer (transformers' Llama4TextConfig: no_rope_layers,
no_rope_layer_interval 4). vLLM's hybrid KV cache manager keeps attention_chunk_size + its in-flight
tokens (2 x max_num_batched_tokens) of a sequence in a chunked layer (ChunkedLocalAttentionSpec's max memory
per request), on GPUs, with no KV connector or NIXL, as it does for sliding windows. Counted as full layers,
Llama 4 Scout at 131072 tokens had a third of the KV tokens vLLM gives it; counted as kept where vLLM
keeps every token (LMCache, cpu) or in another engine, the plan would promise KV the engine lacks."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.spec import AcceleratorSpec, ModelSpec
from kubemoe_operator.catalog import Catalog, ModelFacts, load_catalog, resolve_gpu, resolve_model
from kubemoe_operator.local.model import facts_from_config_json
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.plan.sizing import engine_kv, vllm_in_flight_tokens
from tests.operator.helpers import REPO

CATALOG = load_catalog()
H100 = resolve_gpu(AcceleratorSpec(type="H100"), CATALOG)
SCOUT = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
KEPT = 8192 + vllm_in_flight_tokens(H100)
# A Llama 4 Scout config.json as the Hub serves it (the keys the planner reads): no_rope_layers empty,
# so transformers' default, a global layer every 4.
SCOUT_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "text_config": {
        "attention_chunk_size": 8192,
        "head_dim": 128,
        "hidden_size": 5120,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760,
        "no_rope_layers": [],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "torch_dtype": "bfloat16",
        "vocab_size": 202048,
    },
}


def _catalogued(name: str) -> ModelFacts:
    return resolve_model(ModelSpec(name=name, source="hf://org/model"), CATALOG)


def _full_layer(model: ModelFacts, tensor: int) -> float:
    return 2 * max(1, model.num_key_value_heads // tensor) * model.head_dim * 2  # K and V, bf16


@pytest.mark.parametrize("name", [SCOUT, "meta-llama/Llama-4-Maverick-17B-128E-Instruct"])
def test_llama4_catalog_entries_attend_in_chunks(name: str) -> None:
    model = _catalogued(name)
    assert (model.attention_chunk_size, model.chunked_layers) == (8192, 36)


def test_a_llama4_checkpoints_config_json_attends_in_chunks_too() -> None:
    config = ModelConfig.model_validate(facts_from_config_json(SCOUT_CONFIG_JSON))
    no_models = Catalog(models=(), gpus=CATALOG.gpus)
    model = resolve_model(ModelSpec(name="m", source="file:///m", config=config), no_models)
    assert (model.attention_chunk_size, model.chunked_layers) == (8192, 36)


def _from_config_json(text_config: dict[str, Any]) -> ModelFacts:
    cfg = copy.deepcopy(SCOUT_CONFIG_JSON)
    cfg["text_config"].update(text_config)
    config = ModelConfig.model_validate(facts_from_config_json(cfg))
    no_models = Catalog(models=(), gpus=CATALOG.gpus)
    return resolve_model(ModelSpec(name="m", source="file:///m", config=config), no_models)


@pytest.mark.parametrize(
    ("text_config", "chunking"),
    [
        ({"attention_chunk_size": 4096}, (4096, 36)),
        ({"no_rope_layers": [1, 1, 0] * 16}, (8192, 32)),  # what the checkpoint marks, not the default
        ({"no_rope_layer_interval": 2}, (8192, 24)),
        ({"attention_chunk_size": None}, (None, 0)),  # a Llama 4 without chunks: every layer full
    ],
)
def test_a_checkpoints_own_chunking_wins_over_the_architectures_default(
    text_config: dict[str, Any], chunking: tuple[int | None, int]
) -> None:
    model = _from_config_json(text_config)
    assert (model.attention_chunk_size, model.chunked_layers) == chunking
    kept = engine_kv(model, engine="vllm", gpu=H100, connector=None)
    assert (kept.chunked_kept is None) == (chunking[0] is None)


def test_more_chunked_layers_than_layers_is_refused_naming_the_field() -> None:
    config = ModelConfig.model_validate({"chunkedAttentionLayers": 60})
    with pytest.raises(ManifestError) as err:
        resolve_model(ModelSpec(name=SCOUT, source="hf://org/model", config=config), CATALOG)
    (problem,) = err.value.problems
    assert problem.field == "spec.model.config.chunkedAttentionLayers"
    assert "60 chunked-attention layers but only 48 layers" in problem.message


def test_other_architectures_attend_over_the_whole_sequence() -> None:
    for name in ("deepseek-ai/DeepSeek-V3", "Qwen/Qwen3-235B-A22B", "openai/gpt-oss-120b"):
        model = _catalogued(name)
        assert (model.attention_chunk_size, model.chunked_layers) == (None, 0)
        assert engine_kv(model, engine="vllm", gpu=H100, connector=None).chunked_kept is None


def test_chunked_layers_cost_what_vllm_keeps_of_them() -> None:
    model = _catalogued(SCOUT)
    full = _full_layer(model, tensor=8)
    kept = engine_kv(model, engine="vllm", gpu=H100, connector=None)
    assert kept.chunked_kept == KEPT
    assert engine_kv(model, engine="vllm", gpu=H100, connector="nixl").chunked_kept == KEPT
    assert kept.kv_bytes_per_token(tensor=8, max_len=KEPT) == 48 * full  # within what it keeps
    long = kept.kv_bytes_per_token(tensor=8, max_len=131072)
    assert long == pytest.approx((12 + 36 * KEPT / 131072) * full)
    cpu = resolve_gpu(AcceleratorSpec(type="cpu"), CATALOG)
    for other in (
        engine_kv(model, engine="vllm", gpu=H100, connector="lmcache"),
        engine_kv(model, engine="vllm", gpu=cpu, connector=None),
        engine_kv(model, engine="sglang", gpu=H100, connector=None),
        engine_kv(model, engine="tgi", gpu=H100, connector=None),
    ):
        assert other.chunked_kept is None
        assert other.kv_bytes_per_token(tensor=8, max_len=131072) == 48 * full


def test_llama4_scout_example_plans_vllms_kv() -> None:
    """examples/llama-4-scout.yaml (vLLM, TP8 on H100, 131072 tokens): one KV head per rank, 512 bytes a
    layer; 12 full layers and 36 that keep 8192 + 2 x 8192 in-flight of the 131072 tokens: 18.75 layers,
    9600 bytes a token (24576, all 48 layers, before)."""
    (role,) = plan_manifest(load_manifest(REPO / "examples" / "llama-4-scout.yaml")).roles
    assert role.memory.kv_bytes_per_token == 9600
    assert role.memory.kv_tokens == pytest.approx(
        role.memory.kv_budget_gib * 1024**3 / 9600, abs=2
    )  # rounded GiB


def test_with_lmcache_llama4_kv_counts_every_layer_in_full() -> None:
    data = copy.deepcopy(load_manifest(REPO / "examples" / "llama-4-scout.yaml").model_dump(by_alias=True))
    parallelism = {"tensor": 8, "data": 1, "expert": 1}
    data["spec"]["serving"] = {"mode": "disaggregated", "kvTransfer": {"connector": "lmcache"}}
    pod = {"env": [{"name": "LMCACHE_REMOTE_URL", "value": "redis://kv:6379"}]}
    role = {"parallelism": parallelism, "pod": pod}
    data["spec"]["roles"] = {"prefill": role, "decode": role}
    for planned in plan_manifest(parse_manifest(data)).roles:
        assert planned.memory.kv_bytes_per_token == 48 * 512


@pytest.mark.parametrize(
    ("sliding", "chunked"),
    [((8319, 18), (None, 0)), ((None, 0), (KEPT, 36)), ((8319, 6), (KEPT, 30)), ((8319, 18), (KEPT, 30))],
)
def test_longest_sequence_is_the_longest_that_fits(
    sliding: tuple[int | None, int], chunked: tuple[int | None, int]
) -> None:
    """Layers of both kinds together: the longest sequence costs at most the budget, one token more
    costs more (its cost counted token by token, each layer keeping at most what it keeps)."""
    model = replace(
        _catalogued(SCOUT),
        sliding_kept=sliding[0],
        sliding_window_layers=sliding[1],
        chunked_kept=chunked[0],
        chunked_layers=chunked[1],
    )
    per_layer = model.kv_bytes_per_layer_token(tensor=8)

    def cost(length: int) -> float:
        bounded = model.bounded_layers()
        full = model.num_layers - sum(layers for _, layers in bounded)
        return per_layer * (full * length + sum(layers * min(kept, length) for kept, layers in bounded))

    for budget in (1e6, cost(8319), cost(8319) + 1, cost(KEPT) - 1, 5e9, 4e10):
        longest = model.longest_sequence(budget, tensor=8)
        if longest < 2**31:
            assert cost(longest) <= budget < cost(longest + 1), budget


def test_only_bounded_layers_fit_any_length_once_full() -> None:
    model = replace(_catalogued(SCOUT), chunked_kept=KEPT, chunked_layers=48)
    full = 48 * KEPT * 512.0
    assert model.longest_sequence(full + 1, tensor=8) == 2**31
    assert model.longest_sequence(full, tensor=8) == KEPT
    assert model.longest_sequence(full - 1, tensor=8) == KEPT - 1
