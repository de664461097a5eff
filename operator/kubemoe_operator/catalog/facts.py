"""Complete facts about a model architecture and an accelerator, and the sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3

# Bytes per stored element. MXFP4 is 4-bit values plus one 8-bit scale per 32 (4.25 bits).
DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "mxfp4": 4.25 / 8,
    "int4": 0.5,
}


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """A model's architecture with every field the planner needs filled in."""

    name: str
    reference: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_routed_experts: int
    num_shared_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    intermediate_size: int
    num_dense_layers: int
    moe_layer_step: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    dtype: str
    weight_dtype: str
    expert_weight_dtype: str
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    params_total_b: float | None = None
    params_active_b: float | None = None
    sliding_window: int | None = None
    sliding_window_layers: int = 0
    sliding_kept: int | None = None
    """Tokens of a sequence a sliding-window layer keeps in the engine that serves it (plan/sizing.py
    `engine_kv`); None: the engine keeps every token there too, as in a full layer."""
    attention_chunk_size: int | None = None
    """Chunked local attention (Llama 4's `attention_chunk_size`): a chunked layer attends only within
    its chunk of this many tokens."""
    chunked_layers: int = 0
    """How many layers attend in chunks; the others attend over the whole sequence."""
    chunked_kept: int | None = None
    """Tokens of a sequence a chunked layer keeps in the engine that serves it (as `sliding_kept`)."""

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V3 family): one compressed KV per token and layer."""
        return self.kv_lora_rank is not None

    @property
    def moe_layers(self) -> int:
        """Layers whose FFN is a mixture of experts."""
        return sum(
            1 for i in range(self.num_dense_layers, self.num_layers) if (i + 1) % self.moe_layer_step == 0
        )

    def attention_params_per_layer(self) -> int:
        h, heads = self.hidden_size, self.num_attention_heads
        if self.kv_lora_rank is not None:
            rope = self.qk_rope_head_dim or 0
            nope = self.qk_nope_head_dim or self.head_dim
            v = self.v_head_dim or self.head_dim
            q_out = heads * (nope + rope)
            q = h * self.q_lora_rank + self.q_lora_rank * q_out if self.q_lora_rank else h * q_out
            kv = h * (self.kv_lora_rank + rope) + self.kv_lora_rank * heads * (nope + v)
            return q + kv + heads * v * h
        hd = self.head_dim
        return h * heads * hd + 2 * h * self.num_key_value_heads * hd + heads * hd * h

    @property
    def params_per_expert(self) -> int:
        """Gated FFN: gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def routed_params(self) -> int:
        """Parameters of all routed experts: what expert parallelism shards."""
        return self.moe_layers * self.num_routed_experts * self.params_per_expert

    @property
    def router_params(self) -> int:
        """The MoE routers' weights: one [experts, hidden] gate a MoE layer."""
        return self.moe_layers * self.num_routed_experts * self.hidden_size

    @property
    def unquantized_params(self) -> int:
        """The embeddings, the LM head and the MoE routers: a quantized checkpoint's quantization_config
        quantizes the linear layers only and keeps these in `dtype` (DeepSeek-V3/R1's and Kimi K2's fp8
        safetensors store embed_tokens, lm_head and mlp.gate in bf16; vLLM loads the embeddings and the
        head unquantized, and the router as a plain linear layer)."""
        embeddings_and_head = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.router_params + embeddings_and_head

    @property
    def dense_params(self) -> int:
        """Everything else: attention, shared experts, dense FFNs, routers, embeddings."""
        dense_ffn_layers = self.num_layers - self.moe_layers
        return (
            self.num_layers * self.attention_params_per_layer()
            + self.moe_layers * self.num_shared_experts * self.params_per_expert
            + dense_ffn_layers * 3 * self.hidden_size * self.intermediate_size
            + self.unquantized_params
        )

    @property
    def router_bytes(self) -> float:
        """Bytes of the MoE routers (kept in `dtype`, see `unquantized_params`): every tensor rank holds them
        whole."""
        return self.router_params * DTYPE_BYTES[self.dtype]

    @property
    def dense_weight_bytes(self) -> float:
        """Bytes of the dense weights: the linear layers at `weight_dtype`, `unquantized_params` at
        `dtype` (norms and quantization scales, a few MB, are left out)."""
        unquantized = self.unquantized_params
        quantized = self.dense_params - unquantized
        return quantized * DTYPE_BYTES[self.weight_dtype] + unquantized * DTYPE_BYTES[self.dtype]

    @property
    def total_params(self) -> int:
        return self.dense_params + self.routed_params

    def kv_bytes_per_layer_token(self, *, tensor: int) -> float:
        """KV-cache bytes one token occupies on one rank in one layer that keeps it.

        MLA caches the compressed latent plus the rope key (kvLoraRank + qkRopeHeadDim), replicated on
        every tensor-parallel rank. GQA caches K and V for the rank's KV heads (replicated when
        tensor > KV heads, as vLLM does).
        """
        elem = DTYPE_BYTES[self.dtype]
        if self.kv_lora_rank is not None:
            return (self.kv_lora_rank + (self.qk_rope_head_dim or 0)) * elem
        kv_heads = max(1, self.num_key_value_heads // tensor)
        return 2 * kv_heads * self.head_dim * elem

    def bounded_layers(self) -> list[tuple[int, int]]:
        """(tokens kept, layers) of each kind of layer that keeps only part of a sequence in the engine
        serving it (sliding-window, chunked), fewest tokens first; empty where every layer keeps all."""
        kinds = [(self.sliding_kept, self.sliding_window_layers), (self.chunked_kept, self.chunked_layers)]
        return sorted((kept, layers) for kept, layers in kinds if kept and layers)

    def kv_bytes_per_token(self, *, tensor: int, max_len: int | None = None) -> float:
        """KV-cache bytes one token occupies on one rank, over all layers, in sequences of `max_len`: a
        layer that keeps `kept` tokens of a sequence (sliding-window, chunked) costs min(kept, max_len) /
        max_len of a full layer per token (without a length, counted as a full layer)."""
        layers: float = self.num_layers
        if max_len:
            for kept, bounded in self.bounded_layers():
                layers -= bounded * (1 - min(kept, max_len) / max_len)
        return layers * self.kv_bytes_per_layer_token(tensor=tensor)

    def longest_sequence(self, budget_bytes: float, *, tensor: int) -> int:
        """The longest one sequence whose KV fits `budget_bytes` on a rank. Past a layer's kept tokens
        only the other layers grow, so it is not budget / kv_bytes_per_token(max_len) at another length:
        the cost grows by `growing` layers per token between one kept count and the next."""
        per_layer = self.kv_bytes_per_layer_token(tensor=tensor)
        growing, held = self.num_layers, 0  # layers still growing; token-layers of those that stopped
        for kept, layers in self.bounded_layers():
            if budget_bytes <= (held + growing * kept) * per_layer:
                break
            growing -= layers
            held += layers * kept
        if growing == 0:
            return 2**31  # only bounded layers: any length fits once they are full
        return int((budget_bytes / per_layer - held) // growing)


@dataclass(frozen=True, kw_only=True)
class GpuFacts:
    """One accelerator type."""

    name: str
    memory_gib: float
    """Memory the driver reports (nvidia-smi total), in GiB."""
    reserve_gib: float
    """Kept back for activations, CUDA graphs and the runtime before KV is sized."""
    resource: str | None
    """Extended resource name (nvidia.com/gpu, amd.com/gpu); None for cpu."""
    product_labels: tuple[str, ...] = ()
    """Node label values it appears under (nvidia.com/gpu.product, amd.com/gpu.product-name)."""
    label_key: str | None = None

    @property
    def is_cpu(self) -> bool:
        return self.resource is None
