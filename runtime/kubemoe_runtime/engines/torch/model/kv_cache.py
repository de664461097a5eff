"""A slot-based KV cache: `slots` sequences of up to `max_len` positions, per layer.

Each attention layer says what it stores per position (`cache_fields`): grouped-query attention keeps
keys and values `{"k": (G, C), "v": (G, C)}`; multi-head latent attention keeps the compressed latent and
the shared rotary key `{"latent": (L,), "k_rope": (R,)}` — 1/H-th the bytes of expanded keys.

A forward step writes its new positions into the rows (`slots_B`) of the sequences it runs and reads
positions [0, S) back; a sequence's slot is its row for its whole life, so requests can join and leave a
running batch (continuous batching) without moving anyone else's cache.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class LayerCache:
    """One layer's storage: name -> tensor [slots, max_len, *per_position_shape]."""

    def __init__(
        self,
        fields: Mapping[str, tuple[int, ...]],
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
    ) -> None:
        self.max_len = max_len
        self.tensors = {
            name: torch.zeros((slots, max_len, *shape), dtype=dtype) for name, shape in fields.items()
        }

    def write(
        self, name: str, *, slots_B: torch.Tensor, pos_BT: torch.Tensor, value_BT: torch.Tensor
    ) -> None:
        stored = self.tensors[name]
        stored[slots_B[:, None], pos_BT] = (
            value_BT if value_BT.dtype == stored.dtype else value_BT.to(stored.dtype)
        )

    def read(
        self, name: str, *, slots_B: torch.Tensor, length: int, rows: slice | None = None
    ) -> torch.Tensor:
        """Positions [0, length) of the given slots: [B, S, ...]. With `rows`, the slots as a slice (they
        are consecutive): a view, not a copy."""
        if rows is not None:
            return self.tensors[name][rows, :length]
        return self.tensors[name][slots_B, :length]


class KVCache:
    """The cache of every layer for `slots` concurrent sequences."""

    def __init__(
        self,
        per_layer_fields: list[dict[str, tuple[int, ...]]],
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
    ) -> None:
        self.slots = slots
        self.max_len = max_len
        self.layers = [LayerCache(f, slots=slots, max_len=max_len, dtype=dtype) for f in per_layer_fields]

    def export_slot(self, slot: int, *, length: int) -> list[dict[str, torch.Tensor]]:
        """A copy of one sequence's first `length` positions, layer by layer (for P/D KV transfer)."""
        return [
            {name: t[slot, :length].clone() for name, t in layer.tensors.items()} for layer in self.layers
        ]

    def import_slot(self, slot: int, kv: list[dict[str, torch.Tensor]]) -> int:
        """Write an exported sequence into `slot`; returns its length."""
        if len(kv) != len(self.layers):
            raise ValueError(f"KV has {len(kv)} layers but this model has {len(self.layers)}")
        length = 0
        for layer, saved in zip(self.layers, kv, strict=True):
            if set(saved) != set(layer.tensors):
                raise ValueError(f"KV fields {sorted(saved)} do not match {sorted(layer.tensors)}")
            for name, t in saved.items():
                length = t.shape[0]
                if length > self.max_len:
                    raise ValueError(f"KV of {length} positions exceeds the cache's {self.max_len}")
                layer.tensors[name][slot, :length] = t.to(layer.tensors[name].dtype)
        return length
