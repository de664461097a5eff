"""The facts the runtime needs from a checkpoint's config.json, in one typed, architecture-neutral record.

config.json spells the same idea differently per family (`num_experts`, `num_local_experts`,
`n_routed_experts`; `rope_theta` at the top level or inside `rope_parameters`) and across transformers
versions. `ModelConfig.from_dict` is the one place that knows those spellings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

SUPPORTED_ARCHITECTURES: Final = ("qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2")

# Model types that are DeepSeek-V3's architecture under another name: Kimi K2's config.json says
# `model_type: kimi_k2` (its remote code is DeepSeek-V3's; transformers loads it as DeepseekV3ForCausalLM).
DEEPSEEK_V3_TYPES: Final = ("deepseek_v3", "kimi_k2")

Scoring = Literal["softmax", "sigmoid"]


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

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

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
            return _parse(arch, cfg)
        except KeyError as err:
            raise ConfigError(f"{source}: missing key {err.args[0]!r} for model_type {arch!r}") from err


def _parse(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    num_layers = int(cfg["num_hidden_layers"])
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported yet (only default RoPE)")
    rope_theta = float(_first(cfg, "rope_theta", default=rope.get("rope_theta", 10000.0)))
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
