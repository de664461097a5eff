"""The decoder: Qwen3-MoE, Mixtral, DeepSeek-V3, Kimi K2 and Llama 4 (text) as one pre-norm transformer with
swappable parts.

Shape-suffix legend (tensor names end in their dims, e.g. x_BTD, w_down_EDF; 2F: gate and up side by side):
    B  batch rows (sequences in this step)    T  new tokens per row       S  attended key positions
    N  tokens on this rank (B*T)              M  tokens over the EP group D  hidden size
    V  vocabulary                             H  query heads              G  key/value heads
    C  head dim                               R  rotary dims (MLA)        L  KV latent rank (MLA)
    E  routed experts                         F  expert / MLP hidden      K  experts per token
    X  query, key and value heads together (H + 2G)

    Qwen3-MoE    Attention(q/k RMSNorm) + MoE(softmax top-K, renormalised); dense MLP in mlp_only_layers
    Mixtral      Attention + MoE(softmax top-K, renormalised)
    DeepSeek-V3  LatentAttention + MoE(sigmoid, group-limited, biased choice, shared expert);
                 dense MLP in the first `first_k_dense_replace` layers
    Kimi K2      DeepSeek-V3's architecture (model_type kimi_k2): one expert group, so no group limit
    Llama 4      Attention(per layer: rotary + L2 q/k norm + chunked, or no rotary + temperature tuning)
                 + MoE(sigmoid of the top-K logits scaling the experts' input, shared expert) every
                 `interleave_moe_layer_step`-th layer; dense MLP (intermediate_size_mlp) in the others
"""

from __future__ import annotations

import torch
from torch import nn

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.kv_cache import KVCache, LayerCache
from kubemoe_runtime.engines.torch.model.layers import MLP, Attention, LatentAttention, Positions, RMSNorm
from kubemoe_runtime.engines.torch.model.moe import MoE
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, *, layer: int, ep: ExpertParallel, placement: Placement | None = None
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn: Attention | LatentAttention = (
            LatentAttention(cfg) if cfg.uses_mla else Attention(cfg, layer=layer)
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.ffn: MoE | MLP = (
            MoE(cfg, ep=ep, placement=placement, layer=layer)
            if cfg.moe_layers[layer]
            else MLP(cfg.hidden_size, cfg.dense_intermediate_size)
        )

    def forward(
        self, x_BTD: torch.Tensor, delta_BTD: torch.Tensor | None, *, at: Positions, cache: LayerCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer on the residual stream x + delta (delta: the previous layer's MLP output, not yet
        added; None in the first layer): (the stream after attention, this layer's MLP output). Each add
        runs with the norm after it, in one pass (RMSNorm.add)."""
        x_BTD, normed_BTD = self.attn_norm.add(x_BTD, delta_BTD)
        attn_BTD: torch.Tensor = self.attn(normed_BTD, at=at, cache=cache)
        h_BTD, normed_BTD = self.ffn_norm.add(x_BTD, attn_BTD)
        ffn_BTD: torch.Tensor = self.ffn(normed_BTD)
        return h_BTD, ffn_BTD


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, ep: ExpertParallel, placement: Placement | None = None) -> None:
        """`placement`: which experts each MoE layer's slots hold (placement.py); default: contiguous
        blocks."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, layer=i, ep=ep, placement=placement) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, *, slots: int, max_len: int, dtype: torch.dtype) -> KVCache:
        fields = [block.attn.cache_fields() for block in self.blocks()]
        return KVCache(fields, slots=slots, max_len=max_len, dtype=dtype)

    def blocks(self) -> list[Block]:
        return [b for b in self.layers if isinstance(b, Block)]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        pos_BT: torch.Tensor,
        cache: KVCache | None = None,
        slots_B: torch.Tensor | None = None,
        last_only: bool = False,
        logits_at_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for `tokens_BT` at positions `pos_BT`; [B, 1, V] with `last_only` (the last
        column) or with `logits_at_B` (column `logits_at_B[b]` of row b: the last real token of a padded row).

        Without a cache the step attends only to its own tokens (teacher forcing); with one it writes its
        keys into rows `slots_B` (default 0..B-1) and attends to every cached position up to its own.
        """
        if slots_B is None:
            slots_B = torch.arange(tokens_BT.shape[0])
        cfg = self.cfg
        x_BTD = self.embed(tokens_BT)
        at = Positions.make(
            pos_BT,
            slots_B,
            rope_dim=cfg.qk_rope_head_dim if cfg.uses_mla else cfg.head_dim,
            theta=cfg.rope_theta,
            dtype=x_BTD.dtype,
            cached=cache is not None,
            llama3=cfg.rope_llama3,
            chunk=cfg.attention_chunk_size or None,
        )
        delta_BTD: torch.Tensor | None = None
        for i, block in enumerate(self.blocks()):
            x_BTD, delta_BTD = block(
                x_BTD, delta_BTD, at=at, cache=cache.layers[i] if cache is not None else None
            )
        if last_only:
            x_BTD, delta_BTD = x_BTD[:, -1:], None if delta_BTD is None else delta_BTD[:, -1:]
        elif logits_at_B is not None:
            rows_B = torch.arange(x_BTD.shape[0])
            x_BTD = x_BTD[rows_B, logits_at_B][:, None]
            delta_BTD = None if delta_BTD is None else delta_BTD[rows_B, logits_at_B][:, None]
        _, normed_BTD = self.norm.add(x_BTD, delta_BTD)
        logits_BTV: torch.Tensor = self.lm_head(normed_BTD)
        return logits_BTV
