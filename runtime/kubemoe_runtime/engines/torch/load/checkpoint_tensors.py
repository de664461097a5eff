"""A checkpoint's tensors by name: those config.json implies it holds, with their shapes
(`checkpoint_shapes`), and the names of each routed expert's tensors (`routed_expert_names`).

Fused experts (Llama 4): a MoE layer stores all its experts in two tensors, `...experts.gate_up_proj`
[E, D, 2F] and `...experts.down_proj` [E, F, D]. Expert e's part of each is one contiguous span of the
tensor's bytes, so a rank still reads only its own experts: the loader names each expert's part a piece,
`...experts.{e}.gate_up_proj` (`fused_source` maps it back, `stored_name` gives the tensor that holds a
name's bytes), and chooses among pieces (`loadable_names`) as it does among any tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from kubemoe_runtime.engines.torch.load.model_config import LLAMA4_TYPES, ModelConfig

_FUSED: Final = re.compile(r"^(.+\.experts)\.(gate_up_proj|down_proj)$")  # every expert of a layer
_FUSED_PIECE: Final = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_up_proj|down_proj)$")  # one expert's part


def fused_source(name: str) -> tuple[str, int] | None:
    """A fused expert tensor's piece (`...experts.3.gate_up_proj`: expert 3's part of
    `...experts.gate_up_proj`) -> (the stored tensor's name, the expert); None for any other name."""
    match = _FUSED_PIECE.match(name)
    return (f"{match.group(1)}.{match.group(3)}", int(match.group(2))) if match else None


def stored_name(name: str) -> str:
    """The checkpoint tensor that holds `name`'s bytes: itself, or a piece's fused tensor."""
    source = fused_source(name)
    return name if source is None else source[0]


def loadable_names(expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What a rank chooses from: every checkpoint tensor, a fused expert tensor as one piece per expert."""
    names: list[str] = []
    for name, shape in expected.items():
        fused = _FUSED.match(name)
        if fused is None:
            names.append(name)
        else:
            names += [f"{fused.group(1)}.{e}.{fused.group(2)}" for e in range(shape[0])]
    return names


def _ffn(cfg: ModelConfig, layer: int) -> str:
    """The checkpoint prefix of a layer's MLP or MoE block."""
    block = (
        "feed_forward" if cfg.arch in LLAMA4_TYPES else {"mixtral": "block_sparse_moe"}.get(cfg.arch, "mlp")
    )
    return f"{cfg.weight_prefix}model.layers.{layer}.{block}"


def routed_expert_names(cfg: ModelConfig, layer: int, expert: int) -> tuple[str, ...]:
    """The checkpoint names of routed expert `expert` of MoE layer `layer`: gate, up and down projections;
    with fused experts (Llama 4) the expert's pieces of gate_up_proj and down_proj."""
    prefix = f"{_ffn(cfg, layer)}.experts"
    if cfg.fused_experts:
        return f"{prefix}.{expert}.gate_up_proj", f"{prefix}.{expert}.down_proj"
    names = ("w1", "w3", "w2") if cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return tuple(f"{prefix}.{expert}.{name}.weight" for name in names)


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, by Hugging Face name, with the shape config.json implies (a
    multimodal checkpoint's other tensors, e.g. a vision encoder, are not needed:
    LoadReport.skipped_tensors)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    top = cfg.weight_prefix
    shapes: dict[str, tuple[int, ...]] = {
        f"{top}model.embed_tokens.weight": (v, d),
        f"{top}model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes[f"{top}lm_head.weight"] = (v, d)

    def mlp(prefix: str, hidden: int, names: tuple[str, str, str]) -> None:
        gate, up, down = names
        shapes[f"{prefix}.{gate}.weight"] = (hidden, d)
        shapes[f"{prefix}.{up}.weight"] = (hidden, d)
        shapes[f"{prefix}.{down}.weight"] = (d, hidden)

    for i in range(cfg.num_layers):
        p = f"{top}model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        a = f"{p}.self_attn"
        if cfg.uses_mla:
            qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            if cfg.q_lora_rank is None:
                shapes[f"{a}.q_proj.weight"] = (cfg.num_heads * qk, d)
            else:
                shapes[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, d)
                shapes[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
                shapes[f"{a}.q_b_proj.weight"] = (cfg.num_heads * qk, cfg.q_lora_rank)
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
            shapes[f"{a}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
            shapes[f"{a}.kv_b_proj.weight"] = (
                cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            )
            shapes[f"{a}.o_proj.weight"] = (d, cfg.num_heads * cfg.v_head_dim)
        else:
            hd = cfg.head_dim
            shapes[f"{a}.q_proj.weight"] = (cfg.num_heads * hd, d)
            shapes[f"{a}.k_proj.weight"] = (cfg.num_kv_heads * hd, d)
            shapes[f"{a}.v_proj.weight"] = (cfg.num_kv_heads * hd, d)
            shapes[f"{a}.o_proj.weight"] = (d, cfg.num_heads * hd)
            if cfg.qk_norm:
                shapes[f"{a}.q_norm.weight"] = (hd,)
                shapes[f"{a}.k_norm.weight"] = (hd,)
        ffn = _ffn(cfg, i)
        if not cfg.moe_layers[i]:
            mlp(ffn, cfg.dense_intermediate_size, ("gate_proj", "up_proj", "down_proj"))
            continue
        f, n = cfg.moe_intermediate_size, cfg.n_routed_experts
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        if cfg.fused_experts:  # Llama 4: a router, every expert in two tensors, one shared expert
            shapes[f"{ffn}.router.weight"] = (n, d)
            shapes[f"{ffn}.experts.gate_up_proj"] = (n, d, 2 * f)
            shapes[f"{ffn}.experts.down_proj"] = (n, f, d)
            mlp(f"{ffn}.shared_expert", shared, ("gate_proj", "up_proj", "down_proj"))
            continue
        shapes[f"{ffn}.gate.weight"] = (n, d)
        if cfg.scoring == "sigmoid":
            shapes[f"{ffn}.gate.e_score_correction_bias"] = (n,)
        for e in range(n):
            gate, up, down = routed_expert_names(cfg, i, e)
            shapes[gate], shapes[up], shapes[down] = (f, d), (f, d), (d, f)
        if cfg.n_shared_experts:
            mlp(f"{ffn}.shared_experts", shared, ("gate_proj", "up_proj", "down_proj"))
    return shapes
