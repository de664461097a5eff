from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_is_sharded_hf_layout(checkpoints: dict[str, Path], arch: str) -> None:
    ckpt = checkpoints[arch]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3
    assert all((ckpt / shard).exists() for shard in shards)
    cfg = ModelConfig.load(ckpt)
    assert cfg.arch == arch
    assert any(cfg.moe_layers)
    if cfg.fused_experts:  # Llama 4, as on the Hub: a MoE layer's experts in two tensors
        fused = [
            n for n in index["weight_map"] if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        ]
        assert len(fused) == 2 * sum(cfg.moe_layers)
    else:
        experts = [n for n in index["weight_map"] if ".experts.0." in n]
        assert experts, "routed experts are stored one tensor per expert, as on the Hub"


def test_deepseek_checkpoint_uses_mla_shared_expert_and_group_routing(checkpoints: dict[str, Path]) -> None:
    cfg = ModelConfig.load(checkpoints["deepseek_v3"])
    assert cfg.uses_mla
    assert cfg.n_shared_experts == 1
    assert cfg.n_group > 1
    assert cfg.topk_group > 1
    assert cfg.scoring == "sigmoid"
    names = json.loads((checkpoints["deepseek_v3"] / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names


def test_kimi_k2_checkpoint_is_deepseek_v3_under_its_own_model_type(checkpoints: dict[str, Path]) -> None:
    """As on the Hub: `model_type: kimi_k2`, DeepseekV3ForCausalLM's tensors, one expert group (no
    group-limited routing), sigmoid scoring scaled by 2.827."""
    raw = json.loads((checkpoints["kimi_k2"] / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2"
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (raw["scoring_func"], raw["topk_method"]) == ("sigmoid", "noaux_tc")
    cfg = ModelConfig.load(checkpoints["kimi_k2"])
    assert cfg.arch == "kimi_k2"
    assert cfg.uses_mla
    assert (cfg.n_group, cfg.topk_group, cfg.scoring) == (1, 1, "sigmoid")
    assert cfg.routed_scaling_factor == pytest.approx(2.827)
    assert cfg.moe_layers == (False, True, True)  # first_k_dense_replace 1
    deepseek = json.loads((checkpoints["deepseek_v3"] / "model.safetensors.index.json").read_text())
    kimi = json.loads((checkpoints["kimi_k2"] / "model.safetensors.index.json").read_text())
    assert set(kimi["weight_map"]) == set(deepseek["weight_map"])


def test_a_deepseek_router_other_than_sigmoid_noaux_tc_is_refused(checkpoints: dict[str, Path]) -> None:
    from kubemoe_runtime.engines.torch.load.model_config import ConfigError

    raw = json.loads((checkpoints["kimi_k2"] / "config.json").read_text())
    assert ModelConfig.from_dict(raw).scoring == "sigmoid"
    with pytest.raises(ConfigError, match="scoring_func 'softmax'"):
        ModelConfig.from_dict({**raw, "scoring_func": "softmax"})
    with pytest.raises(ConfigError, match="topk_method 'greedy'"):
        ModelConfig.from_dict({**raw, "topk_method": "greedy"})


def test_tokenizer_has_chat_template(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoints["qwen3_moe"]))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "route the tokens"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nroute the tokens<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("the experts route tokens")["input_ids"]
    assert len(ids) < len("the experts route tokens")  # BPE merged something
    assert tok.decode(ids) == "the experts route tokens"
    assert tok.eos_token == "<|im_end|>"


def test_module_command_line(tmp_path: Path) -> None:
    out = tmp_path / "mixtral"
    subprocess.run(
        [sys.executable, "-m", "kubemoe_runtime.tools.checkpoints", str(out), "--arch", "mixtral"],
        check=True,
        capture_output=True,
    )
    assert ModelConfig.load(out).arch == "mixtral"
    assert (out / "tokenizer.json").exists()
