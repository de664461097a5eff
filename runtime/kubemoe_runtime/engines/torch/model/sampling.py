"""Next-token choice: greedy, or temperature, top-k and nucleus (top-p) sampling from a seeded generator.

SamplingParams refuses what the sampler cannot run (ValueError naming the field), so a bad value fails
when the request is built, on the server's thread, never on the engine thread mid-step.

Logits without a meaningful choice — a NaN or +infinity anywhere in the row, or every entry -infinity
(an overflow in the forward) — raise NonFiniteLogits, greedy or not: argmax would pick the NaN's index
(token 0 when the whole row is NaN) and the softmax would be NaN. The check reads the row's maximum, which
NaN and +infinity always reach, so it costs one element for greedy and one reduction otherwise; a row
with some -infinity entries among finite ones is a well-defined distribution and samples as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_SEED = -(1 << 63)  # what torch.Generator.manual_seed takes: int64 .. uint64
MAX_SEED = (1 << 64) - 1
GREEDY_BELOW = 1e-5  # a temperature this small samples greedily (as vLLM): logits / T would overflow


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0 or -1: every token

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive count, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


class NonFiniteLogits(ValueError):
    """A row of logits with a NaN or +infinity, or only -infinity: no token can be chosen from it."""


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits; NonFiniteLogits when the row has no meaningful choice."""
    if params.greedy:
        token = int(logits_V.argmax())  # a NaN's index if there is one (torch's max propagates NaN)
        _check_finite(logits_V[token])
        return token
    logits_V = logits_V.float() / params.temperature
    _check_finite(logits_V.max())  # after the division: a small temperature may overflow it
    if 0 < params.top_k < logits_V.numel():
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1:
        sorted_V, order_V = probs_V.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside_V = sorted_V.cumsum(dim=-1) - sorted_V >= params.top_p
        outside_V[0] = False  # even for a top_p that float32 rounds to 0 (the request's is a float64)
        sorted_V = sorted_V.masked_fill(outside_V, 0.0)
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def _check_finite(top: torch.Tensor) -> None:
    """`top`: the row's maximum (NaN if the row has one)."""
    value = float(top)
    if not math.isfinite(value):
        raise NonFiniteLogits(f"the logits are not finite (their maximum is {value})")
