"""A quantized checkpoint keeps its embeddings, LM head and MoE routers unquantized: DeepSeek-V3/R1's and
Kimi K2's fp8 quantization_config (block-wise, 128x128) covers the linear layers, and their safetensors
store embed_tokens, lm_head and mlp.gate in bf16, as vLLM loads them. Sized at fp8 (1 byte), DeepSeek-V3's
1.96B such parameters were 1.8 GiB short on every rank, taken from the KV budget the plan promised."""

from __future__ import annotations

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.spec import ModelSpec, Parallelism
from kubemoe_operator.catalog import ModelFacts, load_catalog, resolve_model
from kubemoe_operator.catalog.facts import DTYPE_BYTES, GIB
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.plan.sizing import size_rank
from tests.operator.helpers import REPO

CATALOG = load_catalog()
FP8 = ["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2-Instruct"]


def _catalogued(name: str) -> ModelFacts:
    return resolve_model(ModelSpec(name=name, source="hf://org/model"), CATALOG)


@pytest.mark.parametrize("name", FP8)
def test_fp8_checkpoints_keep_embeddings_head_and_routers_in_bf16(name: str) -> None:
    model = _catalogued(name)
    assert (model.dtype, model.weight_dtype) == ("bfloat16", "fp8")
    embeddings_and_head = 2 * model.vocab_size * model.hidden_size  # untied
    routers = model.moe_layers * model.num_routed_experts * model.hidden_size
    assert model.unquantized_params == embeddings_and_head + routers
    linear = model.dense_params - model.unquantized_params
    assert model.dense_weight_bytes == linear * 1 + model.unquantized_params * 2


def test_deepseek_v3_weighs_what_its_checkpoint_does() -> None:
    """671B parameters: 669.1B at fp8 and 1.96B (embeddings 0.93B, LM head 0.93B, routers 0.11B) at bf16,
    673.0 GB (671.0 GB before). The Hub's fp8 checkpoint, ~688 GB, adds the multi-token-prediction layer
    (num_nextn_predict_layers: 11.5B parameters of its own) that vLLM loads only for MTP speculation."""
    model = _catalogued("deepseek-ai/DeepSeek-V3")
    weights = model.dense_weight_bytes + model.routed_params * DTYPE_BYTES[model.expert_weight_dtype]
    assert model.unquantized_params / 1e9 == pytest.approx(1.96, abs=0.01)
    assert weights / 1e9 == pytest.approx(673.0, abs=0.1)


def test_deepseek_v3_example_ranks_hold_the_bf16_parts() -> None:
    """examples/deepseek-v3.yaml (TP1, EP16): every rank holds the embeddings, the LM head and the routers
    whole, one byte a parameter more than at fp8."""
    model = _catalogued("deepseek-ai/DeepSeek-V3")
    bf16_parts = (2 * model.vocab_size + model.moe_layers * model.num_routed_experts) * model.hidden_size
    at_fp8 = model.dense_params / GIB
    for role in plan_manifest(load_manifest(REPO / "examples" / "deepseek-v3.yaml")).roles:
        assert role.memory.dense_weights_gib == pytest.approx(at_fp8 + bf16_parts / GIB, abs=1e-3)
        assert role.memory.dense_weights_gib == pytest.approx(17.766, abs=1e-3)  # 15.941 before


@pytest.mark.parametrize("name", ["Qwen/Qwen3-235B-A22B", "openai/gpt-oss-120b", "Mixtral-8x7B"])
def test_unquantized_dense_weights_are_unchanged(name: str) -> None:
    model = _catalogued(name)
    assert model.weight_dtype == model.dtype == "bfloat16"
    assert model.dense_weight_bytes == model.dense_params * 2


def test_every_tensor_rank_holds_all_the_routers() -> None:
    """vLLM shards attention, the embeddings and the LM head over the tensor ranks, but each holds every
    MoE router whole (a replicated linear layer): Kimi K2's 60 x 384 x 7168 bf16 routers (0.33 GB) on every
    rank of a TP8 group, not an eighth of them."""
    model = _catalogued("moonshotai/Kimi-K2-Instruct")
    assert model.router_bytes == 60 * 384 * 7168 * 2

    def dense_gib(tensor: int) -> float:
        par = Parallelism(tensor=tensor, data=1, expert=1)
        return size_rank(
            model=model, par=par, device_gib=1000.0, utilization=0.9, reserve_gib=1.0, max_len=4096
        ).memory.dense_weights_gib

    split = (model.dense_weight_bytes - model.router_bytes) / GIB
    assert dense_gib(1) == pytest.approx(model.dense_weight_bytes / GIB, abs=1e-4)
    assert dense_gib(8) == pytest.approx(split / 8 + model.router_bytes / GIB, abs=1e-4)
