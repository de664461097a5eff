"""The benchmarks' random MoE: the Qwen3-MoE layout of issue 8, generated once and cached on disk.

    8 layers, hidden 1024, 16 query heads / 4 KV heads of 64, 32 routed experts of 512, top-4, bf16:
    about 425 M parameters (the vocabulary is the 512-token BPE trained here, as vLLM needs vocab = tokenizer)

BENCH_LAYERS=N scales the layer count down (or up) on a slow machine; the output says what was used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from kubemoe_runtime.tools.checkpoints import SPECIAL_TOKENS, write_tokenizer

# New tokens each engine decodes after its prompt in bench_engine.py and llamacpp.py (BENCH_DECODE)
DECODE: Final = int(os.environ.get("BENCH_DECODE", "96"))
CACHE: Final = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "kubemoe-bench"))
VOCAB: Final = 512


@dataclass(frozen=True)
class Layout:
    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    experts: int = 32
    expert_hidden: int = 512
    top_k: int = 4

    @property
    def name(self) -> str:
        return (
            f"qwen3moe-L{self.layers}-D{self.hidden}-E{self.experts}x{self.expert_hidden}-k{self.top_k}-bf16"
        )

    def expert_bytes(self, *, bytes_per: int = 2) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_hidden * bytes_per

    def dense_bytes_per_layer(self, *, bytes_per: int = 2) -> int:
        """Attention, router and norms of one layer: read by every decode step."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        router = self.hidden * self.experts
        norms = 2 * self.hidden + 2 * self.head_dim
        return (q_o + k_v + router + norms) * bytes_per

    def decode_step_bytes(self, batch: int, *, bytes_per: int = 2) -> float:
        """Weight bytes one decode step reads: dense weights, the LM head, and the experts its tokens pick
        (expected distinct experts per layer for `batch` tokens routed uniformly at random)."""
        distinct = self.experts * (1 - (1 - self.top_k / self.experts) ** batch)
        per_layer = self.dense_bytes_per_layer(bytes_per=bytes_per) + distinct * self.expert_bytes(
            bytes_per=bytes_per
        )
        lm_head = VOCAB * self.hidden * bytes_per
        return self.layers * per_layer + lm_head


def layout_from_env() -> Layout:
    layers = int(os.environ.get("BENCH_LAYERS", "8"))
    return Layout(layers=layers)


def qwen3_config(layout: Layout, *, vocab_size: int) -> Any:
    """transformers' Qwen3MoeConfig for `layout`."""
    from transformers import Qwen3MoeConfig

    config_cls: Any = Qwen3MoeConfig  # transformers' stubs lag its configs' keywords
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=layout.hidden,
        intermediate_size=2 * layout.hidden,
        moe_intermediate_size=layout.expert_hidden,
        num_hidden_layers=layout.layers,
        num_attention_heads=layout.heads,
        num_key_value_heads=layout.kv_heads,
        head_dim=layout.head_dim,
        num_experts=layout.experts,
        num_experts_per_tok=layout.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        bos_token_id=None,
    )


def save(model: Any, out: Path, layout: Layout, *, max_shard_size: str = "100MB") -> None:
    """Save a transformers Qwen3-MoE `model` in `out`, with the legacy config.json keys vLLM's pinned
    transformers reads."""
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("num_experts", config.get("num_local_experts", layout.experts))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    config.setdefault("torch_dtype", config.get("dtype", "bfloat16"))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def checkpoint(layout: Layout) -> Path:
    """Write (once) and return the checkpoint directory for `layout`."""
    out = CACHE / layout.name
    if (out / "model.safetensors.index.json").exists():
        return out
    from transformers import Qwen3MoeForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out, vocab_size=VOCAB)
    model_cls: Any = Qwen3MoeForCausalLM  # transformers' stubs lag its models' keywords
    torch.manual_seed(0)
    save(model_cls(qwen3_config(layout, vocab_size=vocab)).to(torch.bfloat16), out, layout)
    return out


def threads() -> int:
    """The thread count every engine gets: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def read_bandwidth_gbs(*, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s with torch's threads: best sum over a buffer larger than any cache."""
    import time

    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best / 1e9
