"""Architecture facts of a model, as `spec.model.config` and as catalog entries.

Every field is optional: an inline `config` overrides the catalog entry field by field, and
a model missing from the catalog must give the required ones inline. Names follow the
Hugging Face `config.json` keys they come from (noted per field), in camelCase.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubemoe_operator.api.base import ApiModel

ActivationDtype = Literal["float32", "bfloat16", "float16"]
WeightDtype = Literal["float32", "bfloat16", "float16", "fp8", "mxfp4", "int4"]


class ModelConfig(ApiModel):
    """Architecture facts (config.json) that size the layout; inline values override the catalog.

    Maximums are far above any published model (so a typo, or a hostile spec, cannot make the
    planner loop over billions of divisors): e.g. 4096 attention heads, 16384 routed experts."""

    architecture: str | None = Field(None, max_length=128)
    """config.json `architectures[0]`, e.g. DeepseekV3ForCausalLM."""
    num_layers: int | None = Field(None, ge=1, le=1024)
    """`num_hidden_layers`."""
    hidden_size: int | None = Field(None, ge=1, le=2**18)
    """`hidden_size`."""
    num_attention_heads: int | None = Field(None, ge=1, le=4096)
    """`num_attention_heads`."""
    num_key_value_heads: int | None = Field(None, ge=1, le=4096)
    """`num_key_value_heads` (grouped-query attention; ignored with MLA)."""
    head_dim: int | None = Field(None, ge=1, le=4096)
    """`head_dim`; defaults to hiddenSize / numAttentionHeads."""
    q_lora_rank: int | None = Field(None, ge=1, le=2**16)
    """MLA `q_lora_rank` (absent: full-rank queries)."""
    kv_lora_rank: int | None = Field(None, ge=1, le=2**16)
    """MLA `kv_lora_rank`; setting it marks the model as multi-head latent attention."""
    qk_rope_head_dim: int | None = Field(None, ge=1, le=4096)
    """MLA `qk_rope_head_dim`."""
    qk_nope_head_dim: int | None = Field(None, ge=1, le=4096)
    """MLA `qk_nope_head_dim`."""
    v_head_dim: int | None = Field(None, ge=1, le=4096)
    """MLA `v_head_dim`."""
    num_routed_experts: int | None = Field(None, ge=1, le=2**14)
    """`n_routed_experts` / `num_experts` / `num_local_experts`."""
    num_shared_experts: int | None = Field(None, ge=0, le=256)
    """`n_shared_experts` (0 when the model has none)."""
    experts_per_token: int | None = Field(None, ge=1, le=1024)
    """`num_experts_per_tok` (top-k)."""
    moe_intermediate_size: int | None = Field(None, ge=1, le=2**20)
    """`moe_intermediate_size`: the FFN width of one routed expert."""
    intermediate_size: int | None = Field(None, ge=1, le=2**20)
    """`intermediate_size`: the FFN width of dense layers (defaults to the expert width)."""
    num_dense_layers: int | None = Field(None, ge=0, le=1024)
    """`first_k_dense_replace`: leading layers with a dense FFN instead of experts."""
    moe_layer_step: int | None = Field(None, ge=1, le=1024)
    """`interleave_moe_layer_step`: every n-th layer is MoE (1: all)."""
    vocab_size: int | None = Field(None, ge=1, le=2**24)
    """`vocab_size`."""
    tie_word_embeddings: bool | None = None
    """`tie_word_embeddings`."""
    max_position_embeddings: int | None = Field(None, ge=1, le=2**26)
    """`max_position_embeddings`: the default maximum sequence length."""
    sliding_window: int | None = Field(None, ge=1, le=2**26)
    """`sliding_window`: the tokens a sliding-window attention layer looks back over (and caches)."""
    sliding_window_layers: int | None = Field(None, ge=0, le=1024)
    """How many of `layer_types` are `sliding_attention` (gpt-oss: 18 of 36); each caches at most
    slidingWindow tokens of a sequence (as vLLM's hybrid KV cache keeps them), the rest every token."""
    attention_chunk_size: int | None = Field(None, ge=1, le=2**26)
    """`attention_chunk_size` (Llama 4: 8192, its default there): a chunked-attention layer attends within
    chunks of this many tokens."""
    chunked_attention_layers: int | None = Field(None, ge=0, le=1024)
    """How many layers attend in chunks: the ones `no_rope_layers` marks 1 (Llama 4: all but every
    no_rope_layer_interval-th, 36 of 48; 0 where attention_chunk_size is null); the rest attend over the
    whole sequence."""
    dtype: ActivationDtype | None = None
    """`torch_dtype`: activations and the KV cache."""
    weight_dtype: WeightDtype | None = None
    """Stored weights (e.g. fp8 from `quantization_config`); defaults to dtype."""
    expert_weight_dtype: WeightDtype | None = None
    """Routed-expert weights when they differ (e.g. gpt-oss MXFP4); defaults to weightDtype."""
    params_total_b: float | None = Field(None, gt=0, le=1e5, alias="paramsTotalB")
    """Total parameters in billions, from the model card (informational; sizing uses the layout)."""
    params_active_b: float | None = Field(None, gt=0, le=1e5, alias="paramsActiveB")
    """Active parameters per token in billions, from the model card (informational)."""
