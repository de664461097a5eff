"""The facts the runtime needs from a checkpoint's config.json, in one typed, architecture-neutral record.

config.json spells the same idea differently per family (`num_experts`, `num_local_experts`,
`n_routed_experts`; `rope_theta` at the top level or inside `rope_parameters`) and across transformers
versions. `ModelConfig.from_dict` is the one place that knows those spellings.

Llama 4's text model (`model_type: llama4_text`, transformers' Llama4ForCausalLM) is read as transformers'
Llama4TextConfig reads it, defaults included: MoE layers every `interleave_moe_layer_step` (or the
`moe_layers` list), layers without rotary embeddings every `no_rope_layer_interval` (`no_rope_layers`:
1 where a layer HAS rotary embeddings), chunked attention in the layers with them (`layer_types`). A
multimodal Llama 4 config.json (`model_type: llama4`) is read as its `text_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

SUPPORTED_ARCHITECTURES: Final = ("qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2", "llama4_text", "llama4")

# Llama 4's text model alone (Llama4ForCausalLM), and the Hub's multimodal checkpoints
# (Llama4ForConditionalGeneration: the language model's config in `text_config`, its tensors under
# `language_model.`, beside a vision encoder the torch engine does not load).
LLAMA4_TYPES: Final = ("llama4_text", "llama4")

# Model types that are DeepSeek-V3's architecture under another name: Kimi K2's config.json says
# `model_type: kimi_k2` (its remote code is DeepSeek-V3's; transformers loads it as DeepseekV3ForCausalLM).
DEEPSEEK_V3_TYPES: Final = ("deepseek_v3", "kimi_k2")

Scoring = Literal["softmax", "sigmoid", "sigmoid_top"]
"""How the gate weighs experts: softmax over all, then top-K (Qwen3-MoE, Mixtral); sigmoid, biased and
group-limited choice (DeepSeek-V3, Kimi K2); sigmoid of each of the top-K logits (Llama 4)."""


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model this runtime does not support."""


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # attention head size; for MLA the rope part (qk_rope_head_dim)
    dense_intermediate_size: int  # the MLP of non-MoE layers
    moe_intermediate_size: int  # one routed expert's hidden size
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]  # per layer: routed MoE (True) or dense MLP (False)
    scoring: Scoring
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]
    # Multi-head latent attention (DeepSeek); zero / None elsewhere.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Llama 3 rope scaling (Llama 4): factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; None: plain rotary frequencies.
    rope_llama3: tuple[float, float, float, float] | None = None
    # Llama 4; empty / off elsewhere.
    nope_layers: tuple[int, ...] = ()  # layers without rotary embeddings
    chunked_layers: tuple[int, ...] = ()  # layers attending only within their chunk of positions
    attention_chunk_size: int = 0
    qk_l2_norm: bool = False  # queries and keys L2-normalised (no weight) after rotary, in rotary layers
    attn_temperature_tuning: bool = False  # no-rotary layers scale queries up with the position
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    expert_input_weighted: bool = False  # the routing weight scales an expert's input, not its output
    weight_prefix: str = ""  # before every checkpoint tensor name ("language_model." in a multimodal one)

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def fused_experts(self) -> bool:
        """Each MoE layer stores every routed expert in two tensors (Llama 4), not three per expert."""
        return self.arch in LLAMA4_TYPES

    @classmethod
    def load(cls, model_dir: Path | str) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: not found") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: model_type {arch!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            if arch == "llama4":
                return _parse_llama4_multimodal(cfg)
            return _parse(arch, cfg)
        except KeyError as err:
            raise ConfigError(f"{source}: missing key {err.args[0]!r} for model_type {arch!r}") from err


def _parse(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    num_layers = int(cfg["num_hidden_layers"])
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported yet (only default and llama3 RoPE)")
    rope_llama3 = None
    if rope_type == "llama3":
        rope_llama3 = (
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            float(rope["original_max_position_embeddings"]),
        )
    default_theta = 500000.0 if arch in LLAMA4_TYPES else 10000.0  # transformers' defaults
    rope_theta = float(_first(cfg, "rope_theta", default=rope.get("rope_theta", default_theta)))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    common: dict[str, Any] = {
        "arch": arch,
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": int(_first(cfg, "num_key_value_heads", default=num_heads)),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "dtype": str(_first(cfg, "dtype", "torch_dtype", default="bfloat16")),
        "eos_token_ids": eos_ids,
        "top_k": int(cfg["num_experts_per_tok"]),
        "rope_llama3": rope_llama3,
    }
    if arch == "qwen3_moe":
        n_experts = int(_first(cfg, "num_experts", "num_local_experts"))
        step = int(cfg.get("decoder_sparse_step", 1))
        dense_only = set(cfg.get("mlp_only_layers") or [])
        return ModelConfig(
            **common,
            head_dim=int(_first(cfg, "head_dim", default=hidden // num_heads)),
            dense_intermediate_size=int(cfg["intermediate_size"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            n_routed_experts=n_experts,
            n_shared_experts=0,
            moe_layers=tuple(
                i not in dense_only and n_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
            ),
            scoring="softmax",
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            qk_norm=True,
            rope_interleave=False,
        )
    if arch == "mixtral":
        return ModelConfig(
            **common,
            head_dim=int(_first(cfg, "head_dim", default=hidden // num_heads)),
            dense_intermediate_size=0,
            moe_intermediate_size=int(cfg["intermediate_size"]),
            n_routed_experts=int(_first(cfg, "num_local_experts", "num_experts")),
            n_shared_experts=0,
            moe_layers=(True,) * num_layers,
            scoring="softmax",
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            qk_norm=False,
            rope_interleave=False,
        )
    if arch == "llama4_text":
        return _parse_llama4_text(cfg, common)
    # deepseek_v3 and kimi_k2 (DEEPSEEK_V3_TYPES)
    scoring = cfg.get("scoring_func", "sigmoid")
    topk_method = cfg.get("topk_method", "noaux_tc")
    if scoring != "sigmoid" or topk_method != "noaux_tc":
        raise ConfigError(
            f"scoring_func {scoring!r} with topk_method {topk_method!r} is not supported "
            "(DeepSeek-V3's router: sigmoid, noaux_tc)"
        )
    first_dense = int(cfg.get("first_k_dense_replace", 0))
    freq = int(cfg.get("moe_layer_freq", 1))
    rope_dim = int(cfg["qk_rope_head_dim"])
    return ModelConfig(
        **common,
        head_dim=rope_dim,
        dense_intermediate_size=int(cfg["intermediate_size"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        n_routed_experts=int(_first(cfg, "n_routed_experts", "num_local_experts")),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(num_layers)),
        scoring="sigmoid",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        qk_norm=False,
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        q_lora_rank=None if cfg.get("q_lora_rank") is None else int(cfg["q_lora_rank"]),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(cfg["v_head_dim"]),
    )


def _parse_llama4_text(cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    """Llama4TextConfig's reading of config.json (its __post_init__ defaults where a key is absent)."""
    num_layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("interleave_moe_layer_step", 1))
    moe = cfg.get("moe_layers")
    moe_set = set(range(step - 1, num_layers, step)) if moe is None else {int(i) for i in moe}
    interval = int(cfg.get("no_rope_layer_interval", 4))
    # no_rope_layers[i] is 1 where layer i HAS rotary embeddings (transformers' name); empty: the default.
    rope_flags = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(rope_flags) != num_layers:
        raise ConfigError(f"no_rope_layers has {len(rope_flags)} entries for {num_layers} layers")
    chunk = cfg.get("attention_chunk_size")
    layer_types = cfg.get("layer_types") or [
        "chunked_attention" if flag and chunk is not None else "full_attention" for flag in rope_flags
    ]
    unknown = sorted(set(layer_types) - {"chunked_attention", "full_attention"})
    if unknown or len(layer_types) != num_layers:
        raise ConfigError(
            f"layer_types {layer_types!r}: expected chunked_attention or full_attention for each layer"
        )
    chunked = tuple(i for i, kind in enumerate(layer_types) if kind == "chunked_attention")
    chunk_size = int(chunk or 0)
    if chunked and chunk_size <= 0:
        raise ConfigError("layer_types has chunked_attention layers but attention_chunk_size is not set")
    if cfg.get("attention_bias"):
        raise ConfigError("attention_bias is not supported")
    hidden, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelConfig(
        **{**common, "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5))},
        head_dim=int(_first(cfg, "head_dim", default=hidden // num_heads)),
        dense_intermediate_size=int(cfg["intermediate_size_mlp"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        n_routed_experts=int(cfg["num_local_experts"]),
        n_shared_experts=1,  # every Llama 4 MoE layer has one shared expert of the routed experts' size
        moe_layers=tuple(i in moe_set for i in range(num_layers)),
        scoring="sigmoid_top",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        qk_norm=False,
        rope_interleave=True,  # rotary pairs are adjacent dims (transformers' complex form)
        nope_layers=tuple(i for i, flag in enumerate(rope_flags) if not flag),
        chunked_layers=chunked,
        attention_chunk_size=chunk_size if chunked else 0,
        qk_l2_norm=bool(cfg.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=float(cfg.get("floor_scale", 8192)),
        attn_scale=float(cfg.get("attn_scale", 0.1)),
        expert_input_weighted=True,
    )


def _parse_llama4_multimodal(cfg: dict[str, Any]) -> ModelConfig:
    """Llama4ForConditionalGeneration's config.json: its language model, from `text_config` (top-level
    keys such as tie_word_embeddings and torch_dtype where text_config lacks them)."""
    text = cfg["text_config"]
    if not isinstance(text, dict):
        raise ConfigError("text_config is not an object")
    outer = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    merged = {**outer, **{k: v for k, v in text.items() if v is not None}, "model_type": "llama4_text"}
    return replace(_parse("llama4_text", merged), arch="llama4", weight_prefix="language_model.")
