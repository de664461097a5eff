"""Hugging Face checkpoint names -> this engine's parameters.

Most tensors map one to one after a prefix rename. Routed experts are stacked by slot: a MoE layer's
slots hold logical experts (`experts`: the same list for every layer, or each layer's own by layer
index; model/placement.py), and for slot j holding expert e the checkpoint's
`...experts.{e}.{gate_proj|w1}.weight` and `{up_proj|w3}` become entry j of `w_gate_up_E2FD` (gate rows,
then up rows), and `{down_proj|w2}` entry j of `w_down_EDF`. An expert in two slots is copied into both.
Grouped-query attention's `q_proj`, `k_proj` and `v_proj` become one `qkv_proj` (their rows in that order).
Fused experts (Llama 4) come as each expert's pieces (checkpoint_tensors.py):
`...experts.{e}.gate_up_proj` [D, 2F] (gate columns, then up) and `...experts.{e}.down_proj` [F, D],
transposed into the same stacks.

`expert_stacks` makes the stacked parameters before loading, with each expert tensor's place in them, so
the loader reads experts straight into place (`read_planned(into=...)`) and stacking copies nothing;
`qkv_weights` does the same for the fused `qkv_proj` (q, k and v read into its rows), so no weight is
held twice: once in the checkpoint's pieces and once fused. Their shapes come from the checked shard
headers (`plan_rank_weights(...).shapes()`), never from config.json alone: a config whose sizes disagree
with the checkpoint fails by name before anything is allocated.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Final

import torch

from kubemoe_runtime.engines.torch.load.checkpoint_tensors import routed_expert_names
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig

_LAYER: Final = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT: Final = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_PIECE: Final = re.compile(r"^feed_forward\.experts\.(\d+)\.(gate_up_proj|down_proj)$")
# checkpoint projection -> (stacked parameter, which of its parts)
_STACKED: Final = {
    "gate_proj": ("w_gate_up_E2FD", 0),
    "w1": ("w_gate_up_E2FD", 0),
    "up_proj": ("w_gate_up_E2FD", 1),
    "w3": ("w_gate_up_E2FD", 1),
    "down_proj": ("w_down_EDF", 0),
    "w2": ("w_down_EDF", 0),
}
_PARTS: Final = {"w_gate_up_E2FD": 2, "w_down_EDF": 1}
_QKV: Final = re.compile(r"^(layers\.\d+\.attn\.)([qkv])_proj\.weight$")
_CHECKPOINT_QKV: Final = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")
_TOP: Final = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}

Slots = Sequence[int] | Mapping[int, Sequence[int]]
"""Slot experts: one list for every MoE layer, or each MoE layer's own by layer index."""


def layer_slots(experts: Slots, layer: int) -> Sequence[int]:
    if isinstance(experts, Mapping):
        return experts.get(layer, ())
    return experts


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
        ("feed_forward.router.", "ffn.router."),
        ("feed_forward.shared_expert.", "ffn.shared."),
        ("feed_forward.", "ffn."),
    ):
        if rest.startswith(hf):
            return f"layers.{layer}.{ours}{rest[len(hf) :]}"
    raise KeyError(f"no parameter for checkpoint tensor model.layers.{layer}.{rest}")


def expert_stacks(
    shapes: Mapping[str, tuple[int, ...]], *, experts: Slots, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Empty stacked expert parameters for the slot experts `experts`, by parameter name, and each
    checkpoint expert tensor's place in them (its first slot), by checkpoint name (`shapes`: checkpoint
    name -> shape)."""
    stacks: dict[str, torch.Tensor] = {}
    places: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        layer = _LAYER.match(name)
        expert = _EXPERT.match(layer.group(2)) if layer else None
        if layer is None or expert is None:
            continue
        slots = list(layer_slots(experts, int(layer.group(1))))
        if int(expert.group(1)) not in slots:
            continue
        param, part = _STACKED[expert.group(2)]
        key, (rows, cols) = f"layers.{layer.group(1)}.ffn.experts.{param}", shape
        if key not in stacks:
            stacks[key] = torch.empty((len(slots), _PARTS[param] * rows, cols), dtype=dtype)
        places[name] = stacks[key][slots.index(int(expert.group(1))), part * rows : (part + 1) * rows]
    return stacks, places


def qkv_weights(
    shapes: Mapping[str, tuple[int, ...]], *, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Empty fused `qkv_proj` weights, by parameter name, and each checkpoint q_proj, k_proj and v_proj
    weight's place in them (its rows), by checkpoint name (`shapes`: checkpoint name -> shape). Nothing for
    MLA, nor for a layer whose three do not make one matrix (to_engine_state_dict reports that)."""
    if cfg.uses_mla:
        return {}, {}
    found: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = defaultdict(dict)
    for name, shape in shapes.items():
        match = _CHECKPOINT_QKV.match(name.removeprefix(cfg.weight_prefix))
        if match is not None and len(shape) == 2:
            found[int(match.group(1))][match.group(2)] = (name, shape)
    fused: dict[str, torch.Tensor] = {}
    places: dict[str, torch.Tensor] = {}
    for layer, parts in found.items():
        if sorted(parts) != ["k", "q", "v"] or len({shape[1] for _, shape in parts.values()}) != 1:
            continue
        rows = [parts[p][1][0] for p in "qkv"]
        weight = torch.empty((sum(rows), parts["q"][1][1]), dtype=dtype)
        fused[f"layers.{layer}.attn.qkv_proj.weight"] = weight
        for (name, _), place in zip((parts[p] for p in "qkv"), torch.split(weight, rows), strict=True):
            places[name] = place
    return fused, places


def to_engine_state_dict(
    tensors: dict[str, torch.Tensor],
    *,
    cfg: ModelConfig,
    experts: Slots,
    dtype: torch.dtype,
    stacks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename (and, for routed experts, stack) checkpoint tensors into `Transformer.state_dict()` form.
    `stacks` (from `expert_stacks` and `qkv_weights`) are used as the stacked and fused parameters; parts
    already in place are not copied."""
    out: dict[str, torch.Tensor] = {}
    parts_by_key: dict[str, dict[tuple[int, int], torch.Tensor]] = defaultdict(dict)
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # "layers.i.attn." -> q, k, v
    for prefixed, tensor in tensors.items():
        name = prefixed.removeprefix(cfg.weight_prefix)  # a multimodal checkpoint's language model
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
            e, (param, part) = int(expert.group(1)), _STACKED[expert.group(2)]
            parts_by_key[f"layers.{layer}.ffn.experts.{param}"][(e, part)] = tensor
            continue
        piece = _FUSED_PIECE.match(rest)
        if piece is not None:
            e, experts_key = int(piece.group(1)), f"layers.{layer}.ffn.experts."
            if piece.group(2) == "gate_up_proj":
                gate_FD, up_FD = tensor.t().chunk(2)
                parts_by_key[experts_key + "w_gate_up_E2FD"].update({(e, 0): gate_FD, (e, 1): up_FD})
            else:
                parts_by_key[experts_key + "w_down_EDF"][(e, 0)] = tensor.t()
            continue
        key = _layer_param(cfg, layer, rest)
        if not cfg.uses_mla and (projection := _QKV.match(key)) is not None:
            qkv[projection.group(1)][projection.group(2)] = tensor
            continue
        # A sigmoid router runs in float32 (as DeepSeek and transformers do): keep its tensors so.
        keep_fp32 = cfg.scoring == "sigmoid" and ".ffn.router." in key
        out[key] = tensor.to(torch.float32 if keep_fp32 else dtype)
    for key, parts in parts_by_key.items():
        slots = layer_slots(experts, int(key.split(".")[1]))
        out[key] = _stack(key, parts, slots=slots, dtype=dtype, out=(stacks or {}).get(key))
    for prefix, projections in qkv.items():
        if sorted(projections) != ["k", "q", "v"]:
            raise KeyError(f"{prefix}: expected q_proj, k_proj and v_proj, got {sorted(projections)}")
        key = f"{prefix}qkv_proj.weight"
        out[key] = _fuse([projections[p] for p in "qkv"], dtype=dtype, out=(stacks or {}).get(key))
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def routed_expert_weights(
    tensors: dict[str, torch.Tensor], *, cfg: ModelConfig, layer: int, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take (pop) one routed expert's checkpoint tensors from `tensors` and return it as the engine
    stacks it: gate_up [2F, D] (gate rows, then up rows) and down [D, F]."""
    names = routed_expert_names(cfg, layer, expert)
    if cfg.fused_experts:
        gate_up_D2F, down_FD = (tensors.pop(name) for name in names)
        return gate_up_D2F.t().contiguous(), down_FD.t().contiguous()
    gate, up, down = (tensors.pop(name) for name in names)
    return torch.cat([gate, up]), down


def _fuse(parts: list[torch.Tensor], *, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """`parts` one after another (rows), in `out` when it has their shape and `dtype` (a part already in
    place there is not copied)."""
    rows = [part.shape[0] for part in parts]
    if out is None or out.dtype != dtype or list(out.shape) != [sum(rows), *parts[0].shape[1:]]:
        return torch.cat(parts).to(dtype)
    for part, place in zip(parts, torch.split(out, rows), strict=True):
        if place.data_ptr() != part.data_ptr() or place.dtype != part.dtype:
            place.copy_(part)
    return out


def _stack(
    key: str,
    parts: dict[tuple[int, int], torch.Tensor],
    *,
    slots: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One [S, parts * rows, cols] tensor from each slot's expert's parts (`parts`: by expert id and
    part), copied once into place (into `out` when it has that shape and dtype; a part already there is
    not copied)."""
    n_parts = _PARTS[key.rsplit(".", 1)[1]]
    wanted = sorted(set(slots))
    found = sorted({e for e, _ in parts})
    if found != wanted or len(parts) != len(wanted) * n_parts:
        missing = [f"expert {e} part {p}" for e in wanted for p in range(n_parts) if (e, p) not in parts]
        raise KeyError(
            f"{key}: expected experts {wanted}"
            + (f", missing {', '.join(missing[:4])}" if missing else f", got {found}")
        )
    rows, cols = parts[(wanted[0], 0)].shape
    shape = (len(slots), n_parts * rows, cols)
    if out is None or tuple(out.shape) != shape or out.dtype != dtype:
        out = torch.empty(shape, dtype=dtype)
    for (e, _), tensor in parts.items():
        if tensor.shape != (rows, cols):
            raise KeyError(f"{key}: expert {e} has shape {tuple(tensor.shape)}, not {(rows, cols)}")
    for j, e in enumerate(slots):
        for p in range(n_parts):
            tensor = parts[(e, p)]
            place = out[j, p * rows : (p + 1) * rows]
            if place.data_ptr() != tensor.data_ptr() or place.dtype != tensor.dtype:
                place.copy_(tensor)
    return out
