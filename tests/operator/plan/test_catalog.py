from __future__ import annotations

import pytest

from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.spec import AcceleratorSpec, ModelSpec
from kubemoe_operator.catalog import ModelEntry, load_catalog, resolve_gpu, resolve_model

CATALOG = load_catalog()


@pytest.mark.parametrize("entry", CATALOG.models, ids=lambda e: e.name)
def test_layout_reproduces_model_card_total(entry: ModelEntry) -> None:
    facts = resolve_model(ModelSpec(name=entry.name, source="hf://org/model"), CATALOG)
    card = entry.config.params_total_b
    assert card is not None
    # Llama 4 counts its ~1B vision encoder, which the text layout leaves out.
    assert facts.total_params / 1e9 == pytest.approx(card, rel=0.03)
    assert entry.reference.startswith("https://huggingface.co/")


def test_catalog_covers_the_issue_list() -> None:
    for name in (
        "DeepSeek-V3",
        "DeepSeek-R1",
        "Kimi-K2",
        "Qwen3-235B-A22B",
        "Qwen3-30B-A3B",
        "Llama-4-Scout",
        "Llama-4-Maverick",
        "Mixtral-8x7B",
        "Mixtral-8x22B",
        "gpt-oss-120b",
    ):
        assert CATALOG.model(name) is not None, name
    for gpu in ("A100-40GB", "A100-80GB", "H100", "H200", "B200", "L40S", "MI300X", "cpu"):
        assert CATALOG.gpu(gpu) is not None, gpu


def test_lookup_ignores_case_and_org() -> None:
    entry = CATALOG.model("DEEPSEEK-AI/deepseek-v3")
    assert entry is not None
    assert entry.name == "deepseek-ai/DeepSeek-V3"


def test_gpu_lookup_by_node_label() -> None:
    gpu = resolve_gpu(AcceleratorSpec(type="NVIDIA-H100-80GB-HBM3"), CATALOG)
    assert gpu.name == "H100"
    assert gpu.resource == "nvidia.com/gpu"
    assert gpu.memory_gib == pytest.approx(79.65, abs=0.01)


def test_memory_override_admits_unknown_gpu() -> None:
    gpu = resolve_gpu(AcceleratorSpec(type="RTX-6000-Ada", memory_gib=48), CATALOG)
    assert gpu.memory_gib == 48


def test_inline_config_overrides_catalog() -> None:
    facts = resolve_model(
        ModelSpec(
            name="Qwen/Qwen3-30B-A3B", source="hf://Qwen/Qwen3-30B-A3B", config=ModelConfig(dtype="float32")
        ),
        CATALOG,
    )
    assert facts.dtype == "float32"
    assert facts.num_routed_experts == 128


def test_mla_caches_the_latent_once_per_layer() -> None:
    facts = resolve_model(ModelSpec(name="DeepSeek-V3", source="hf://deepseek-ai/DeepSeek-V3"), CATALOG)
    assert facts.mla
    # 61 layers x (kv_lora_rank 512 + rope 64) x bf16, whatever the tensor-parallel size.
    assert facts.kv_bytes_per_token(tensor=1) == 61 * 576 * 2
    assert facts.kv_bytes_per_token(tensor=8) == 61 * 576 * 2


def test_gqa_kv_heads_split_then_replicate() -> None:
    facts = resolve_model(ModelSpec(name="Qwen3-235B-A22B", source="hf://Qwen/Qwen3-235B-A22B"), CATALOG)
    assert facts.kv_bytes_per_token(tensor=1) == 94 * 2 * 4 * 128 * 2
    assert facts.kv_bytes_per_token(tensor=4) == 94 * 2 * 1 * 128 * 2
    assert facts.kv_bytes_per_token(tensor=8) == 94 * 2 * 1 * 128 * 2  # 4 KV heads replicated over 8 ranks


def test_llama4_maverick_interleaves_moe_layers() -> None:
    facts = resolve_model(ModelSpec(name="Llama-4-Maverick", source="hf://meta-llama/x"), CATALOG)
    assert facts.moe_layers == 24


def test_partial_inline_config_names_missing_fields() -> None:
    with pytest.raises(ManifestError) as err:
        resolve_model(
            ModelSpec(name="acme/moe", source="hf://acme/moe", config=ModelConfig(num_layers=4)), CATALOG
        )
    (problem,) = err.value.problems
    assert problem.field == "spec.model.config"
    assert "hiddenSize" in problem.message
    assert "numRoutedExperts" in problem.message
