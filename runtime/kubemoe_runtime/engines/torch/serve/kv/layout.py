"""What a decode expects of a pulled KV: its model's cache fields per layer and dtype (serve/kv/handoff.py).

A decode knows the prompt's length before it pulls, so it knows how many bytes the prefill's answer
may take (`max_wire_bytes`, checked against the Content-Length before a buffer is allocated) and, once
parsed, the exact shape and dtype of every tensor (`check`): a payload that is anything else fails the
pull (the decode then prefills the prompt itself) and never reaches the engine thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kubemoe_runtime.engines.torch.serve.kv.handoff import KV, PrefilledKV, prompt_digest

HEADER_SLACK_BYTES = 4096  # the header's metadata and padding
HEADER_BYTES_PER_TENSOR = 256  # one tensor's entry: name, dtype, shape, offsets (about 70 bytes)


@dataclass(frozen=True)
class KVLayout:
    fields: tuple[dict[str, tuple[int, ...]], ...]  # per layer: cache field -> per-position shape
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return (
            sum(math.prod(shape) for layer in self.fields for shape in layer.values()) * self.dtype.itemsize
        )

    def max_wire_bytes(self, tokens: int) -> int:
        """The most bytes a hand-off of `tokens` positions can take: the tensors plus the header's room."""
        tensors = sum(len(layer) for layer in self.fields)
        return tokens * self.bytes_per_token + HEADER_SLACK_BYTES + HEADER_BYTES_PER_TENSOR * tensors

    def check(self, pulled: PrefilledKV, *, prompt_ids: Sequence[int], vocab_size: int) -> None:
        """ValueError, saying what differs, unless `pulled` is this prompt's (its length and digest) and fits
        this model: its first token in the vocabulary, every layer's fields, and each tensor
        [prompt_tokens, *shape] of the cache's dtype."""
        if pulled.prompt_tokens != len(prompt_ids) or pulled.prompt_sha256 != prompt_digest(prompt_ids):
            raise ValueError("the pulled KV belongs to another prompt")
        token = pulled.first_token
        if type(token) is not int or not 0 <= token < vocab_size:
            raise ValueError(f"first_token {token!r} is not a token id in [0, {vocab_size})")
        self.check_kv(pulled.kv, tokens=pulled.prompt_tokens)

    def check_kv(self, kv: KV, *, tokens: int) -> None:
        if len(kv) != len(self.fields):
            raise ValueError(f"{len(kv)} layers, but the model has {len(self.fields)}")
        for i, (layer, expected) in enumerate(zip(kv, self.fields, strict=True)):
            if set(layer) != set(expected):
                raise ValueError(f"layer {i} has fields {sorted(layer)}, not {sorted(expected)}")
            for name, tensor in layer.items():
                shape = (tokens, *expected[name])
                if tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
                    raise ValueError(
                        f"{i}.{name} is {list(tensor.shape)} {tensor.dtype}, not {list(shape)} {self.dtype}"
                    )
