"""Next-token choice: greedy, or temperature and nucleus (top-p) sampling from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits."""
    if params.temperature == 0:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_V, order_V = probs_V.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside_V = sorted_V.cumsum(dim=-1) - sorted_V >= params.top_p
        sorted_V = sorted_V.masked_fill(outside_V, 0.0)
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V, 1, generator=generator))
