"""Dense building blocks: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query and latent attention.

Grouped-query attention also takes Llama 4's per-layer variants: layers without rotary embeddings whose
queries grow with the position (temperature tuning), queries and keys L2-normalised after rotary, and
chunked attention (a query attends only keys of its own chunk of `attention_chunk_size` positions).

Shape suffixes (see model.py for the full legend): B batch rows, T new tokens per row, S attended key
positions, D hidden, H query heads, G key/value heads, C head dim, R rotary dims, L latent rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kubemoe_runtime.engines.torch.kernels import moe as kernels
from kubemoe_runtime.engines.torch.kernels.attention import decode_attention
from kubemoe_runtime.engines.torch.kernels.norm import add_rms_norm, norm_rope, rms_norm
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.kv_cache import LayerCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) times the weight, one call: torch computes it in float32 and rounds once (transformers
        rounds before the weight too, so bf16 results may differ from it in the last bit); bf16 on a CPU
        with a kernel library, the library's (kernels/norm.py), which does the same in one pass."""
        if (y := rms_norm(x, self.weight, self.eps)) is not None:
            return y
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)

    def add(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, this norm of it): the residual stream with `r` added (x itself where r is None) and the
        next sublayer's input; one kernel pass where the library has it (kernels/norm.py add_rms_norm),
        the same bits as torch's add and then forward()."""
        if r is None:
            return x, self(x)
        if (fused := add_rms_norm(x, r, self.weight, self.eps)) is not None:
            return fused
        h = x + r
        return h, self(h)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def rope_inv_freq(
    *, dim: int, theta: float, llama3: tuple[float, float, float, float] | None = None
) -> torch.Tensor:
    """Each rotary pair's angle per position, float32 [dim / 2]. `llama3` (factor, low_freq_factor,
    high_freq_factor, original context): Llama 3's scaling, as transformers computes it — wavelengths
    beyond the original context divided by `factor`, those within it by its high-frequency share kept,
    those between interpolated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if llama3 is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, context = llama3
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high_freq_factor) * ~(wavelen > context / low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    pos_BT: torch.Tensor, *, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The rotation of each position, two ways. First full width and ready to broadcast over heads: two
    [B, T, 1, dim] of `dtype`, `cos` of each angle twice ([cos, cos]) and `sin` signed for the rotate-half
    form ([-sin, sin]). Then as the norm_rope kernel takes it: cos and sin [B * T, dim / 2] in the angles'
    dtype. The angles are computed in inv_freq's dtype (float32 from rope_inv_freq)."""
    angles_BTc = pos_BT.float()[..., None] * inv_freq
    cos, sin = angles_BTc.cos(), angles_BTc.sin()
    full = (
        torch.cat((cos, cos), dim=-1)[:, :, None].to(dtype),
        torch.cat((-sin, sin), dim=-1)[:, :, None].to(dtype),
    )
    return full, (cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))


def apply_rope(
    x_BTHC: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], *, interleaved: bool
) -> torch.Tensor:
    """Rotate pairs of dims: halves (x[:C/2], x[C/2:]) by default; adjacent (x[0::2], x[1::2]) if interleaved.

    With [x1, x2] the halves: [x1 cos - x2 sin, x2 cos + x1 sin] = x * [cos, cos] + [x2, x1] * [-sin, sin],
    and [x2, x1] is x rolled by C/2 — four ops. The interleaved form (DeepSeek) first de-interleaves x —
    evens then odds — which is what transformers does; queries and keys get the same permutation, so dot
    products are unchanged.
    """
    if interleaved:
        x_BTHC = torch.cat((x_BTHC[..., 0::2], x_BTHC[..., 1::2]), dim=-1)
    cos, sin = cos_sin
    return x_BTHC * cos + x_BTHC.roll(x_BTHC.shape[-1] // 2, dims=-1) * sin


def causal_mask(pos_BT: torch.Tensor, key_pos_BS: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """True where a query may attend a key: the key's position is not after the query's, and with `chunk`
    both are in the same chunk of that many positions (Llama 4's chunked attention). [B, 1, T, S]."""
    mask_BTS = key_pos_BS[:, None, :] <= pos_BT[:, :, None]
    if chunk is not None:
        mask_BTS &= key_pos_BS[:, None, :] // chunk == pos_BT[:, :, None] // chunk
    return mask_BTS[:, None]


def decode_matmul_attention(
    q_BHTC: torch.Tensor,
    k_BGSC: torch.Tensor,
    v_BGSC: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query a sequence (T = 1) as two float32 (or float64) matmuls over each KV head's R = H / G query
    heads, rounded once to q's dtype; a query that may attend no key gets zeros (as the kernels'). torch's
    CPU flash attention spends its time on bookkeeping at T = 1: batch 16, 16 heads over 4 KV heads of
    64, 160 keys, 2 threads (Zen 4): 2.6 ms a layer in bf16, 0.29 ms this way, as close to float64."""
    B, H, _, C = q_BHTC.shape
    G, S = k_BGSC.shape[1], k_BGSC.shape[2]
    wide = torch.promote_types(q_BHTC.dtype, torch.float32)  # float64 stays float64
    q_BGRC = q_BHTC.reshape(B, G, H // G, C).to(wide)
    scores_BGRS = torch.matmul(q_BGRC, k_BGSC.to(wide).transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores_BGRS.masked_fill_(~mask.reshape(B, 1, 1, S), float("-inf"))
    weights_BGRS = torch.softmax(scores_BGRS, dim=-1).nan_to_num_(nan=0.0)
    out_BGRc = torch.matmul(weights_BGRS, v_BGSC.to(wide))  # c: the values' head size (MLA's differs)
    return out_BGRc.reshape(B, H, 1, -1).to(q_BHTC.dtype)


def attend(
    q_BHTC: torch.Tensor,
    k_BGSC: torch.Tensor,
    v_BGSC: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`. At decode (one query a sequence, bf16 on a CPU with a kernel
    library) the library's decode attention (kernels/attention.py); at decode on a CPU without it, two
    float32 matmuls (`decode_matmul_attention`). Else bf16 through float32 on a CPU whose torch bf16 GEMM
    is slow (no AVX-512: torch's CPU flash attention multiplies its bf16 blocks in a scalar loop there; as
    an AVX2 CPU, batch-16 decode attention took 3.6 ms a layer in bf16 against 0.85 ms in float32)."""
    if (
        q_BHTC.shape[2] == 1
        and (out := decode_attention(q_BHTC, k_BGSC, v_BGSC, mask=mask, scale=scale)) is not None
    ):
        return out
    B, H, T = q_BHTC.shape[:3]
    G, S = k_BGSC.shape[1], k_BGSC.shape[2]
    if (
        T == 1
        and q_BHTC.device.type == "cpu"
        and H % G == 0
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (B, 1, 1, S)))
    ):
        return decode_matmul_attention(q_BHTC, k_BGSC, v_BGSC, mask=mask, scale=scale)
    if q_BHTC.dtype == torch.bfloat16 and q_BHTC.device.type == "cpu" and not kernels.fast_bf16_gemm():
        out = F.scaled_dot_product_attention(
            q_BHTC.float(), k_BGSC.float(), v_BGSC.float(), attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q_BHTC, k_BGSC, v_BGSC, attn_mask=mask, scale=scale, enable_gqa=gqa)


@dataclass(frozen=True)
class Positions:
    """Where one forward's tokens sit: made once per forward (Transformer.forward), read by every layer.

    pos_BT      each new token's position            slots_B    each row's KV-cache slot
    cos_sin     rope_cos_sin(pos_BT), full width     length     S, the cached positions to attend
    cos_sin_NR  the same as float32 halves, a row a token (for the norm_rope kernel)
    mask_B1TS   which keys each query may attend: positions 0 .. S-1 of its cache slot, or, without a
                cache (length None), the step's own tokens
    chunk_mask_B1TS  the same within each query's chunk of positions (chunked attention), or None
    rows        the slots as a slice when they are consecutive (decode's usual case): cache reads are then
                views, not copies
    """

    pos_BT: torch.Tensor
    slots_B: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    cos_sin_NR: tuple[torch.Tensor, torch.Tensor]
    mask_B1TS: torch.Tensor
    chunk_mask_B1TS: torch.Tensor | None
    length: int | None
    rows: slice | None

    @classmethod
    def make(
        cls,
        pos_BT: torch.Tensor,
        slots_B: torch.Tensor,
        *,
        rope_dim: int,
        theta: float,
        dtype: torch.dtype,
        cached: bool,
        llama3: tuple[float, float, float, float] | None = None,
        chunk: int | None = None,
    ) -> Positions:
        """`llama3`: Llama 3 rope scaling (rope_inv_freq); `chunk`: also make the chunked mask."""
        B = pos_BT.shape[0]
        length = int(pos_BT.max()) + 1 if cached else None
        key_pos_BS = pos_BT if length is None else torch.arange(length).expand(B, length)
        slots = slots_B.tolist()
        consecutive = slots == list(range(slots[0], slots[0] + B))
        inv_freq = rope_inv_freq(dim=rope_dim, theta=theta, llama3=llama3)
        cos_sin, cos_sin_NR = rope_cos_sin(pos_BT, inv_freq=inv_freq, dtype=dtype)
        return cls(
            pos_BT=pos_BT,
            slots_B=slots_B,
            cos_sin=cos_sin,
            cos_sin_NR=cos_sin_NR,
            mask_B1TS=causal_mask(pos_BT, key_pos_BS),
            chunk_mask_B1TS=None if chunk is None else causal_mask(pos_BT, key_pos_BS, chunk=chunk),
            length=length,
            rows=slice(slots[0], slots[0] + B) if consecutive else None,
        )


class Attention(nn.Module):
    """Grouped-query attention (Qwen3-MoE with per-head q/k RMSNorm, Mixtral without, Llama 4 per layer:
    see the module docstring) of decoder layer `layer`; queries, keys and values come from one projection
    (`qkv_proj`, the checkpoint's three stacked: weight_map.py).

    Llama 4, as transformers' Llama4TextAttention: rotary (adjacent pairs), then the L2 norm in rotary
    layers; in the others no rotary, and queries times log1p(floor((pos + 1) / floor_scale)) * attn_scale
    + 1. The rotary form permutes the head dims (apply_rope), which neither the L2 norm nor q.k sees.
    """

    def __init__(self, cfg: ModelConfig, *, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        d, c = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * c, bias=False)
        self.o_proj = nn.Linear(self.n_heads * c, d, bias=False)
        self.q_norm = RMSNorm(c, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(c, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = layer not in cfg.nope_layers
        self.interleaved = cfg.rope_interleave
        self.l2_norm_eps = cfg.rms_norm_eps if cfg.qk_l2_norm and self.rope else None
        self.temperature = (
            (cfg.floor_scale, cfg.attn_scale) if cfg.attn_temperature_tuning and not self.rope else None
        )
        self.chunked = layer in cfg.chunked_layers

    def cache_fields(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x_BTD: torch.Tensor, *, at: Positions, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv_BTXC = self.qkv_proj(x_BTD).view(B, T, -1, self.head_dim)
        q_BTHC, k_BTGC, v_BTGC = torch.split(
            qkv_BTXC, [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2
        )
        if fused := self._norm_rope(q_BTHC, k_BTGC, at):
            q_BTHC, k_BTGC = fused
        else:
            if self.q_norm is not None:
                q_BTHC = self.q_norm(q_BTHC)
            if self.k_norm is not None:
                k_BTGC = self.k_norm(k_BTGC)
            if self.rope:
                q_BTHC = apply_rope(q_BTHC, at.cos_sin, interleaved=self.interleaved)
                k_BTGC = apply_rope(k_BTGC, at.cos_sin, interleaved=self.interleaved)
        if self.l2_norm_eps is not None:
            q_BTHC = F.rms_norm(q_BTHC, (self.head_dim,), eps=self.l2_norm_eps)
            k_BTGC = F.rms_norm(k_BTGC, (self.head_dim,), eps=self.l2_norm_eps)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            scale_BT = torch.log1p(torch.floor((at.pos_BT.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_BTHC = (q_BTHC * scale_BT[:, :, None, None]).to(q_BTHC.dtype)

        if cache is None or at.length is None:
            k_BSGC, v_BSGC = k_BTGC, v_BTGC
        else:
            cache.write("k", slots_B=at.slots_B, pos_BT=at.pos_BT, value_BT=k_BTGC)
            cache.write("v", slots_B=at.slots_B, pos_BT=at.pos_BT, value_BT=v_BTGC)
            k_BSGC = cache.read("k", slots_B=at.slots_B, length=at.length, rows=at.rows)
            v_BSGC = cache.read("v", slots_B=at.slots_B, length=at.length, rows=at.rows)

        out_BHTC = attend(
            q_BTHC.transpose(1, 2),
            k_BSGC.transpose(1, 2),
            v_BSGC.transpose(1, 2),
            mask=at.chunk_mask_B1TS if self.chunked else at.mask_B1TS,
            scale=self.head_dim**-0.5,
            gqa=self.n_heads != self.n_kv_heads,
        )
        y_BTD: torch.Tensor = self.o_proj(out_BHTC.transpose(1, 2).reshape(B, T, -1))
        return y_BTD

    def _norm_rope(
        self, q_BTHC: torch.Tensor, k_BTGC: torch.Tensor, at: Positions
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q and k normed (with q/k norms) and rotated in one kernel pass each (kernels/norm.py); None where
        it does not apply (no rotary or the interleaved form here, no kernel, other dtypes)."""
        if not self.rope or self.interleaved:
            return None

        def rotate(x_BTHC: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor | None:
            weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
            return norm_rope(x_BTHC, weight, eps, *at.cos_sin_NR)

        q = rotate(q_BTHC, self.q_norm)
        k = None if q is None else rotate(k_BTGC, self.k_norm)
        return None if q is None or k is None else (q, k)


class LatentAttention(nn.Module):
    """DeepSeek multi-head latent attention (MLA).

    Keys and values are compressed to a latent c (L dims) plus one rotary key shared by all heads (R dims);
    the cache keeps only those, and each step expands the latent into per-head no-rope keys and values.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_heads
        self.n_heads = h
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        self.rope_theta, self.interleaved = cfg.rope_theta, cfg.rope_interleave
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = qk_dim**-0.5
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.latent_dim, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)

    def cache_fields(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.latent_dim,), "k_rope": (self.rope_dim,)}

    def _queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        q: torch.Tensor
        if self.q_proj is not None:
            q = self.q_proj(x_BTD)
        else:
            assert self.q_a_proj is not None
            assert self.q_a_layernorm is not None
            assert self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        return q

    def forward(self, x_BTD: torch.Tensor, *, at: Positions, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H = self.n_heads
        q_BTHc = self._queries(x_BTD).view(B, T, H, self.nope_dim + self.rope_dim)
        q_nope_BTHc, q_rope_BTHR = torch.split(q_BTHc, [self.nope_dim, self.rope_dim], dim=-1)
        kv_a_BTc: torch.Tensor = self.kv_a_proj_with_mqa(x_BTD)
        latent_BTL, k_rope_BTR = torch.split(kv_a_BTc, [self.latent_dim, self.rope_dim], dim=-1)
        latent_BTL = self.kv_a_layernorm(latent_BTL)

        q_rope_BTHR = apply_rope(q_rope_BTHR, at.cos_sin, interleaved=self.interleaved)
        k_rope_BTR = apply_rope(k_rope_BTR[:, :, None, :], at.cos_sin, interleaved=self.interleaved)[:, :, 0]

        if cache is None or at.length is None:
            latent_BSL, k_rope_BSR = latent_BTL, k_rope_BTR
        else:
            cache.write("latent", slots_B=at.slots_B, pos_BT=at.pos_BT, value_BT=latent_BTL)
            cache.write("k_rope", slots_B=at.slots_B, pos_BT=at.pos_BT, value_BT=k_rope_BTR)
            latent_BSL = cache.read("latent", slots_B=at.slots_B, length=at.length, rows=at.rows)
            k_rope_BSR = cache.read("k_rope", slots_B=at.slots_B, length=at.length, rows=at.rows)

        S = latent_BSL.shape[1]
        kv_BSHc = self.kv_b_proj(latent_BSL).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope_BSHc, v_BSHc = torch.split(kv_BSHc, [self.nope_dim, self.v_dim], dim=-1)
        k_BSHc = torch.cat((k_nope_BSHc, k_rope_BSR[:, :, None, :].expand(B, S, H, self.rope_dim)), dim=-1)
        q_BTHc = torch.cat((q_nope_BTHc, q_rope_BTHR), dim=-1)

        out_BHTc = attend(
            q_BTHc.transpose(1, 2),
            k_BSHc.transpose(1, 2),
            v_BSHc.transpose(1, 2),
            mask=at.mask_B1TS,
            scale=self.scale,
        )
        y_BTD: torch.Tensor = self.o_proj(out_BHTc.transpose(1, 2).reshape(B, T, -1))
        return y_BTD
