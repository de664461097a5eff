"""Llama 4 in the torch engine: config.json read as transformers reads it, the fused experts loaded piece
by piece per EP rank, top-2 routing (the tiny checkpoint routes top-1) against transformers, and the Hub's
multimodal layout (Llama4ForConditionalGeneration: its language model served, its vision encoder skipped).

test_torch_engine.py proves the tiny checkpoint itself (logits and greedy tokens at EP=1 and EP=2);
test_expert_load.py and test_expert_placement_live.py run it through the load counts and live placement.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load.checkpoint_files import WeightLoadError
from kubemoe_runtime.engines.torch.load.checkpoint_tensors import fused_source
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import (
    load_expert_tensors,
    load_rank_weights,
    routed_expert_id,
)
from kubemoe_runtime.engines.torch.load.weight_map import routed_expert_weights
from kubemoe_runtime.engines.torch.model.layers import rope_inv_freq
from kubemoe_runtime.engines.torch.model.moe import MoE
from kubemoe_runtime.tools.checkpoints import SPECIAL_TOKENS, tiny_config

PROMPT = [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16, 5, 100, 200, 300, 17, 42, 7, 99]

# Llama-4-Scout's text_config as the Hub serves it (transformers 4.51 keys): no moe_layers, no
# layer_types, no_rope_layers empty, rope_theta at the top level beside rope_scaling.
SCOUT_TEXT = {
    "attention_bias": False,
    "attention_chunk_size": 8192,
    "attn_scale": 0.1,
    "attn_temperature_tuning": 4,
    "floor_scale": 8192,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "interleave_moe_layer_step": 1,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "max_position_embeddings": 10485760,
    "model_type": "llama4_text",
    "no_rope_layers": [],
    "num_attention_heads": 40,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "use_qk_norm": True,
    "vocab_size": 202048,
}
# Maverick's differences: MoE every other layer, 128 experts, no q/k norm.
MAVERICK_TEXT = {**SCOUT_TEXT, "interleave_moe_layer_step": 2, "num_local_experts": 128, "use_qk_norm": False}


def _transformers_config(config_json: dict[str, Any]) -> Any:
    """transformers' Llama4TextConfig of a config.json (rope_scaling as transformers 5 spells it; the
    Hub's attn_temperature_tuning 4 as the bool transformers 5 wants and reads it as)."""
    from transformers import Llama4TextConfig

    keys = set(Llama4TextConfig.__dataclass_fields__) - {"rope_parameters"}
    kwargs = {k: v for k, v in config_json.items() if k in keys}
    kwargs["attn_temperature_tuning"] = bool(kwargs["attn_temperature_tuning"])
    rope = {**config_json["rope_scaling"], "rope_theta": config_json["rope_theta"]}
    return Llama4TextConfig(**kwargs, rope_parameters=rope)


@pytest.mark.parametrize("config_json", [SCOUT_TEXT, MAVERICK_TEXT], ids=["scout", "maverick"])
def test_config_json_reads_as_transformers_reads_it(config_json: dict[str, Any]) -> None:
    cfg = ModelConfig.from_dict(config_json)
    hf = _transformers_config(config_json)
    assert [i for i, moe in enumerate(cfg.moe_layers) if moe] == hf.moe_layers
    assert list(cfg.nope_layers) == [i for i, rope in enumerate(hf.no_rope_layers) if not rope]
    assert list(cfg.chunked_layers) == [i for i, t in enumerate(hf.layer_types) if t == "chunked_attention"]
    assert cfg.nope_layers == tuple(range(3, 48, 4))  # every fourth layer: the Hub's empty list
    assert set(cfg.chunked_layers) == set(range(48)) - set(cfg.nope_layers)
    assert cfg.attention_chunk_size == hf.attention_chunk_size == 8192
    assert cfg.qk_l2_norm == hf.use_qk_norm
    assert cfg.attn_temperature_tuning == bool(hf.attn_temperature_tuning)
    assert (cfg.floor_scale, cfg.attn_scale) == (hf.floor_scale, hf.attn_scale)
    assert (cfg.n_routed_experts, cfg.top_k, cfg.n_shared_experts) == (hf.num_local_experts, 1, 1)
    assert (cfg.moe_intermediate_size, cfg.dense_intermediate_size) == (8192, 16384)
    assert (cfg.head_dim, cfg.rms_norm_eps, cfg.rope_theta) == (128, 1e-5, 500000.0)
    assert cfg.fused_experts
    assert cfg.scoring == "sigmoid_top"


def test_llama3_rope_frequencies_are_transformers_own() -> None:
    """Scout's scaling (low and high frequency factors equal: no interpolated band) and the tiny
    checkpoint's (all three bands), against transformers' llama3 rope parameters."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tiny = tiny_config("llama4_text", vocab_size=512, eos_token_id=2, pad_token_id=0)
    for hf in (_transformers_config(SCOUT_TEXT), tiny):
        want, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        cfg = ModelConfig.from_dict(hf.to_dict())
        assert cfg.rope_llama3 is not None
        got = rope_inv_freq(dim=cfg.head_dim, theta=cfg.rope_theta, llama3=cfg.rope_llama3)
        assert scaling == 1.0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert not torch.equal(got, rope_inv_freq(dim=cfg.head_dim, theta=cfg.rope_theta))


def test_a_malformed_llama4_config_is_refused() -> None:
    from kubemoe_runtime.engines.torch.load.model_config import ConfigError

    with pytest.raises(ConfigError, match="no_rope_layers has 3 entries for 48 layers"):
        ModelConfig.from_dict({**SCOUT_TEXT, "no_rope_layers": [1, 1, 0]})
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict({**SCOUT_TEXT, "layer_types": ["sliding_attention"] * 48})
    with pytest.raises(ConfigError, match="attention_chunk_size is not set"):
        ModelConfig.from_dict(
            {**SCOUT_TEXT, "attention_chunk_size": None, "layer_types": ["chunked_attention"] * 48}
        )
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        ModelConfig.from_dict({**SCOUT_TEXT, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# --- the fused experts, per EP rank --------------------------------------------------------------


def _fused_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every fused expert tensor of the checkpoint, whole, read by safetensors itself."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, shard in index.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[name] = load_file(str(ckpt / shard))[name]
    return out


@pytest.mark.parametrize("ep_size", [2, 4])
def test_each_rank_reads_only_its_experts_of_the_fused_tensors(
    checkpoints: dict[str, Path], ep_size: int
) -> None:
    ckpt = checkpoints["llama4_text"]
    cfg = ModelConfig.load(ckpt)
    fused = _fused_tensors(ckpt)
    assert len(fused) == 4  # layers 1 and 3, gate_up and down each
    _, full = load_rank_weights(ckpt, cfg=cfg)
    seen: set[str] = set()
    for rank in range(ep_size):
        tensors, report = load_rank_weights(ckpt, cfg=cfg, ep_rank=rank, ep_size=ep_size)
        mine = range(rank * 8 // ep_size, (rank + 1) * 8 // ep_size)
        pieces = {name: t for name, t in tensors.items() if fused_source(name) is not None}
        assert not set(fused) & set(tensors), "a whole fused tensor was read"
        assert {routed_expert_id(name) for name in pieces} == set(mine)
        assert len(pieces) == 4 * len(mine)
        for name, piece in pieces.items():
            source = fused_source(name)
            assert source is not None
            stored, expert = source
            assert torch.equal(piece, fused[stored][expert]), name
        assert report.routed_expert_bytes * ep_size == full.routed_expert_bytes
        assert report.routed_expert_bytes == sum(t.numel() * t.element_size() for t in pieces.values())
        assert report.other_bytes == full.other_bytes
        seen |= set(pieces)
    assert len(seen) == 4 * 8


def test_a_placement_reads_its_own_pieces(checkpoints: dict[str, Path]) -> None:
    """Slots in any order, an expert twice: each piece read once, and the live path reads the same."""
    ckpt = checkpoints["llama4_text"]
    cfg = ModelConfig.load(ckpt)
    fused = _fused_tensors(ckpt)
    slots = {1: [7, 0, 7], 3: [2, 5]}
    tensors, report = load_rank_weights(ckpt, cfg=cfg, slots=slots)
    assert report.experts == (0, 2, 5, 7)
    assert sorted(n for n in tensors if fused_source(n)) == sorted(
        f"model.layers.{layer}.feed_forward.experts.{e}.{part}"
        for layer, experts in slots.items()
        for e in set(experts)
        for part in ("gate_up_proj", "down_proj")
    )
    live, _ = load_expert_tensors(ckpt, cfg=cfg, experts={3: [5]})
    gate_up, down = routed_expert_weights(live, cfg=cfg, layer=3, expert=5)
    assert not live  # popped
    assert torch.equal(gate_up, fused["model.layers.3.feed_forward.experts.gate_up_proj"][5].t())
    assert torch.equal(down, fused["model.layers.3.feed_forward.experts.down_proj"][5].t())


def test_the_engine_stacks_hold_each_slot_expert_transposed(checkpoints: dict[str, Path]) -> None:
    """w_gate_up_E2FD[j] is gate_up_proj[e] transposed (gate rows, then up rows); w_down_EDF[j] is
    down_proj[e] transposed."""
    from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel

    ckpt = checkpoints["llama4_text"]
    fused = _fused_tensors(ckpt)
    engine = TorchEngine.load(ckpt, dtype=torch.float32, ep=ExpertParallel(rank=1, size=2))
    layers = engine.moe_layers()
    assert [i for i, _ in layers] == [1, 3]
    for i, block in layers:
        assert list(block.experts.experts) == [4, 5, 6, 7]
        gate_up = fused[f"model.layers.{i}.feed_forward.experts.gate_up_proj"]
        down = fused[f"model.layers.{i}.feed_forward.experts.down_proj"]
        for j, e in enumerate(block.experts.experts):
            assert torch.equal(block.experts.w_gate_up_E2FD[j], gate_up[e].t())
            assert torch.equal(block.experts.w_down_EDF[j], down[e].t())


def _rewrite_header(shard: Path, tensor: str, **changes: object) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[tensor].update(changes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))  # keep the data offsets valid
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n :])


def test_a_fused_tensor_of_the_wrong_shape_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama4_text"], broken)
    name = "model.layers.3.feed_forward.experts.gate_up_proj"
    shard = broken / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite_header(shard, name, shape=[8, 128, 32])  # the same bytes, another shape
    cfg = ModelConfig.load(broken)
    with pytest.raises(WeightLoadError, match=rf"tensor '{name}' has shape \[8, 128, 32\] but config"):
        load_rank_weights(broken, cfg=cfg, ep_rank=1, ep_size=2)
    with pytest.raises(WeightLoadError, match=rf"tensor '{name}' has shape"):
        load_expert_tensors(broken, cfg=cfg, experts={3: [0]})


# --- top-2 routing: each choice's weight scales that expert's input ------------------------------


def test_top2_routing_matches_transformers(tmp_path: Path) -> None:
    """The tiny checkpoint routes top-1; Llama4TextConfig allows more, where transformers' Llama4TextMoe
    runs every expert on its own weighted copy of the input. Same config but top-2, EP=1, float32."""
    import transformers

    eos, pad = SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")
    config = tiny_config("llama4_text", vocab_size=512, eos_token_id=eos, pad_token_id=pad)
    config.num_experts_per_tok = 2
    torch.manual_seed(1)
    model: Any = transformers.Llama4ForCausalLM(config)
    model.eval()
    model.save_pretrained(str(tmp_path), max_shard_size="150KB")
    engine = TorchEngine.load(tmp_path, dtype=torch.float32)
    assert engine.cfg.top_k == 2
    with torch.inference_mode():
        want = model(torch.tensor([PROMPT])).logits[0]
    diff = (engine.logits(PROMPT) - want).abs().max().item()
    print(f"llama4_text top-2 EP=1 max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    moe = [block.ffn for block in engine.model.blocks() if isinstance(block.ffn, MoE)]
    assert moe
    assert all(m.input_weighted for m in moe)


# --- the Hub's layout: Llama4ForConditionalGeneration --------------------------------------------


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny Llama 4 language model inside a Llama4ForConditionalGeneration with a tiny vision encoder,
    saved as the Hub's checkpoints are (`model_type: llama4`, `language_model.` tensors), and the model."""
    import transformers

    eos, pad = SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")
    text = tiny_config("llama4_text", vocab_size=512, eos_token_id=eos, pad_token_id=pad)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": 28,
        "patch_size": 14,
        "vision_output_dim": 32,
        "projector_input_dim": 32,
        "projector_output_dim": 64,
    }
    config = transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision)
    torch.manual_seed(2)
    model: Any = transformers.Llama4ForConditionalGeneration(config)
    model.eval()
    path = tmp_path_factory.mktemp("llama4-multimodal")
    model.save_pretrained(str(path), max_shard_size="150KB")
    return path, model


def test_a_multimodal_checkpoint_serves_its_language_model(multimodal: tuple[Path, Any]) -> None:
    path, model = multimodal
    raw = json.loads((path / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"]) == ("llama4", ["Llama4ForConditionalGeneration"])
    cfg = ModelConfig.load(path)
    assert (cfg.arch, cfg.weight_prefix) == ("llama4", "language_model.")
    assert cfg.moe_layers == (False, True, False, True)
    assert (cfg.nope_layers, cfg.chunked_layers, cfg.rope_llama3) == ((2,), (0, 1, 3), (8.0, 1.0, 4.0, 32.0))

    engine = TorchEngine.load(path, dtype=torch.float32)
    skipped = engine.load_report.skipped_tensors
    assert skipped
    assert all(name.startswith(("vision_model.", "multi_modal_projector.")) for name in skipped)
    # The reference is the model's own Llama4ForCausalLM: transformers 5.24's multimodal forward fails on
    # text alone (its output class lacks `image_outputs`), and without images it runs just that model.
    language_model = model.language_model
    with torch.inference_mode():
        want = language_model(input_ids=torch.tensor([PROMPT])).logits[0]
        greedy = []
        for prompt in (PROMPT, PROMPT[:5]):
            seq = list(prompt)
            for _ in range(10):
                seq.append(int(language_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            greedy.append(seq[len(prompt) :])
    diff = (engine.logits(PROMPT) - want).abs().max().item()
    print(f"llama4 (multimodal checkpoint) EP=1 max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    assert engine.generate_greedy([PROMPT, PROMPT[:5]], max_new_tokens=10) == greedy


def test_a_multimodal_checkpoints_ranks_read_only_their_experts(multimodal: tuple[Path, Any]) -> None:
    path, _ = multimodal
    cfg = ModelConfig.load(path)
    _, full = load_rank_weights(path, cfg=cfg)
    for rank in range(2):
        tensors, report = load_rank_weights(path, cfg=cfg, ep_rank=rank, ep_size=2)
        assert {routed_expert_id(n) for n in tensors if fused_source(n)} == set(range(4 * rank, 4 * rank + 4))
        assert all(n.startswith("language_model.") for n in tensors)
        assert report.routed_expert_bytes * 2 == full.routed_expert_bytes
        assert report.other_bytes == full.other_bytes
        assert report.skipped_tensors == full.skipped_tensors
