"""The planner and the torch engine read the same config.json the same way (#18: Kimi K2, Llama 4).

The operator sizes a model from its catalog entry (catalog/models.yaml, transcribed from the Hub's
config.json) or from a checkpoint's config.json (local/model.py); the runtime reads config.json itself
(load/model_config.py). Neither imports the other, so this checks them against each other:

- the Hub's config.json of Kimi-K2-Instruct, Llama-4-Scout and Llama-4-Maverick: the planner's reading
  sizes each exactly as its catalog entry does (as tests/operator/local/test_local_up.py does for
  DeepSeek-V3, Mixtral and Qwen3), and the runtime reads the same architecture from it;
- every tiny checkpoint the runtime generates: the planner's reading of its config.json is the runtime's.

A Llama 4 config.json has no key for its shared expert (every MoE layer has one): the operator's reader
counts one, as the catalog and the runtime do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubemoe_operator.api.model_config import ModelConfig as SpecModelConfig
from kubemoe_operator.api.spec import ModelSpec
from kubemoe_operator.catalog import Catalog, ModelFacts, load_catalog, resolve_model
from kubemoe_operator.local.model import facts_from_config_json
from kubemoe_runtime.engines.torch.load.model_config import ConfigError, ModelConfig
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

from .test_llama4 import MAVERICK_TEXT, SCOUT_TEXT

# Kimi-K2-Instruct's config.json as the Hub serves it: the keys the planner and the runtime read and the
# ones around them (auto_map, left out, names Moonshot's copy of DeepSeek-V3's modeling code).
KIMI_K2 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 163840,
}


def _multimodal(text_config: dict[str, Any]) -> dict[str, Any]:
    """A Llama 4 config.json as the Hub ships it: the language model's config inside a multimodal one."""
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "tie_word_embeddings": False,
        "text_config": text_config,
        "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34},
    }


PUBLIC = {
    "moonshotai/Kimi-K2-Instruct": KIMI_K2,
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": _multimodal(SCOUT_TEXT),
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct": _multimodal(
        {**MAVERICK_TEXT, "max_position_embeddings": 1048576}
    ),
}
LLAMA4 = [name for name in PUBLIC if "Llama-4" in name]
INFORMATIONAL = {"name", "reference", "params_total_b", "params_active_b"}


def _planned(config_json: dict[str, Any], *, name: str = "m") -> ModelFacts:
    """The planner's facts from config.json alone (no catalog entry)."""
    no_models = Catalog(models=(), gpus=load_catalog().gpus)
    config = SpecModelConfig.model_validate(facts_from_config_json(config_json))
    return resolve_model(ModelSpec(name=name, source="file:///m", config=config), no_models)


def _catalogued(name: str) -> ModelFacts:
    return resolve_model(ModelSpec(name=name, source="hf://org/model"), load_catalog())


def _planner_view(facts: ModelFacts) -> dict[str, Any]:
    """What both sides state about a model, from the planner's facts."""
    moe = [i for i in range(facts.num_dense_layers, facts.num_layers) if (i + 1) % facts.moe_layer_step == 0]
    view: dict[str, Any] = {
        "layers": facts.num_layers,
        "moe_layers": moe,
        "hidden_size": facts.hidden_size,
        "heads": facts.num_attention_heads,
        "kv_heads": facts.num_key_value_heads,
        "routed_experts": facts.num_routed_experts,
        "experts_per_token": facts.experts_per_token,
        "moe_intermediate_size": facts.moe_intermediate_size,
        "dense_intermediate_size": facts.intermediate_size if len(moe) < facts.num_layers else None,
        "vocab_size": facts.vocab_size,
        "tie_word_embeddings": facts.tie_word_embeddings,
    }
    if facts.mla:
        view |= {
            "q_lora_rank": facts.q_lora_rank,
            "kv_lora_rank": facts.kv_lora_rank,
            "qk_rope_head_dim": facts.qk_rope_head_dim,
            "qk_nope_head_dim": facts.qk_nope_head_dim,
            "v_head_dim": facts.v_head_dim,
        }
    else:
        view["head_dim"] = facts.head_dim
    return view


def _runtime_view(cfg: ModelConfig) -> dict[str, Any]:
    """The same, from the runtime's config."""
    moe = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
    view: dict[str, Any] = {
        "layers": cfg.num_layers,
        "moe_layers": moe,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.top_k,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "dense_intermediate_size": cfg.dense_intermediate_size if len(moe) < cfg.num_layers else None,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.uses_mla:
        view |= {
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "v_head_dim": cfg.v_head_dim,
        }
    else:
        view["head_dim"] = cfg.head_dim
    return view


@pytest.mark.parametrize("name", PUBLIC)
def test_public_config_json_plans_as_the_catalog_entry(name: str) -> None:
    """Every planner fact but the shared experts (see the module docstring) from config.json alone."""
    from_file, from_catalog = _planned(PUBLIC[name], name=name), _catalogued(name)
    differ = {
        k: (getattr(from_file, k), getattr(from_catalog, k))
        for k in vars(from_catalog)
        if k not in INFORMATIONAL | {"num_shared_experts"}
        and getattr(from_file, k) != getattr(from_catalog, k)
    }
    assert differ == {}
    assert from_catalog.num_shared_experts == 1
    assert from_file.routed_params == from_catalog.routed_params
    if name not in LLAMA4:
        assert from_file.total_params == from_catalog.total_params


@pytest.mark.parametrize("name", PUBLIC)
def test_the_runtime_reads_the_catalog_entrys_architecture(name: str) -> None:
    config_json = PUBLIC[name]
    if name == "moonshotai/Kimi-K2-Instruct":
        # The torch engine has no YaRN rope yet (neither for DeepSeek-V3): it refuses the real file by
        # name, and reads everything else of it.
        with pytest.raises(ConfigError, match="rope type 'yarn'"):
            ModelConfig.from_dict(config_json)
        config_json = {k: v for k, v in config_json.items() if k != "rope_scaling"}
    cfg = ModelConfig.from_dict(config_json)  # Llama 4's: its text_config, the language model
    facts = _catalogued(name)
    assert _runtime_view(cfg) == _planner_view(facts)
    assert cfg.n_shared_experts == facts.num_shared_experts == 1
    assert cfg.arch == ("kimi_k2" if name not in LLAMA4 else "llama4")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_tiny_checkpoint_plans_as_the_runtime_reads_it(checkpoints: dict[str, Path], arch: str) -> None:
    config_json = json.loads((checkpoints[arch] / "config.json").read_text())
    cfg = ModelConfig.load(checkpoints[arch])
    facts = _planned(config_json)
    assert _planner_view(facts) == _runtime_view(cfg)
    assert facts.dtype == cfg.dtype
    if arch != "llama4_text":
        assert facts.num_shared_experts == cfg.n_shared_experts


def test_the_planner_counts_llama4s_shared_expert_from_config_json(checkpoints: dict[str, Path]) -> None:
    tiny = json.loads((checkpoints["llama4_text"] / "config.json").read_text())
    assert [_planned(c).num_shared_experts for c in (tiny, *(PUBLIC[n] for n in LLAMA4))] == [1, 1, 1]
