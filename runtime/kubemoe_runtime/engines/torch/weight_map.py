"""Hugging Face checkpoint names -> this engine's parameters.

Most tensors map one to one after a prefix rename. Routed experts are stacked: the checkpoint's
`...experts.{e}.{gate_proj|w1}.weight` for each owned expert e becomes row `e - first` of `w_gate_EFD`
(`up_proj|w3` -> `w_up_EFD`, `down_proj|w2` -> `w_down_EDF`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Final

import torch

from kubemoe_runtime.model_config import ModelConfig

_LAYER: Final = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT: Final = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED: Final = {
    "gate_proj": "w_gate_EFD",
    "w1": "w_gate_EFD",
    "up_proj": "w_up_EFD",
    "w3": "w_up_EFD",
    "down_proj": "w_down_EDF",
    "w2": "w_down_EDF",
}
_TOP: Final = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}


def _layer_param(cfg: ModelConfig, layer: int, rest: str) -> str:
    moe = cfg.moe_layers[layer]
    for hf, ours in (
        ("input_layernorm.", "attn_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
        ("self_attn.", "attn."),
        ("block_sparse_moe.gate.", "ffn.router."),
        ("mlp.gate." if moe else "\0", "ffn.router."),
        ("mlp.shared_experts.", "ffn.shared."),
        ("mlp.", "ffn."),
    ):
        if rest.startswith(hf):
            return f"layers.{layer}.{ours}{rest[len(hf) :]}"
    raise KeyError(f"no parameter for checkpoint tensor model.layers.{layer}.{rest}")


def to_engine_state_dict(
    tensors: dict[str, torch.Tensor], *, cfg: ModelConfig, experts: range, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Rename (and, for routed experts, stack) checkpoint tensors into `Transformer.state_dict()` form."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        if name in _TOP:
            out[_TOP[name]] = tensor.to(dtype)
            continue
        if name == "lm_head.weight":
            out[name] = tensor.to(dtype)
            continue
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(f"no parameter for checkpoint tensor {name}")
        layer, rest = int(match.group(1)), match.group(2)
        expert = _EXPERT.match(rest)
        if expert is not None:
            e, proj = int(expert.group(1)), expert.group(2)
            stacks[f"layers.{layer}.ffn.experts.{_STACKED[proj]}"][e - experts.start] = tensor
            continue
        key = _layer_param(cfg, layer, rest)
        # A sigmoid router runs in float32 (as DeepSeek and transformers do): keep its tensors so.
        keep_fp32 = cfg.scoring == "sigmoid" and ".ffn.router." in key
        out[key] = tensor.to(torch.float32 if keep_fp32 else dtype)
    for key, by_index in stacks.items():
        if sorted(by_index) != list(range(len(experts))):
            raise KeyError(
                f"{key}: expected experts {experts.start}..{experts.stop - 1}, got {sorted(by_index)}"
            )
        out[key] = torch.stack([by_index[i] for i in range(len(experts))]).to(dtype)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out
