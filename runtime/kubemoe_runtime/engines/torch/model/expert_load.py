"""Expert load: tokens routed to each logical expert, per MoE layer, over a sliding window.

What is counted: the global routing. Each MoE layer adds its gathered expert ids (`ids_MK`, after the
dispatch, parallel.py) into an int64 accumulator: one (token, choice) slot = one token for that expert.
The dispatch is an all-gather, so every rank — rank 0, the API pod, included — holds the gate's choices
for every token of the whole group: the per-logical-expert load is fully known on rank 0 and nothing has
to be gathered from the other ranks. Logical experts, not this rank's slots: the operator plans
replication from the load of each logical expert, which does not depend on where experts are placed
now; the load of a placement (and its imbalance) follows from it (`Window.imbalance`): a rank's load is
the sum over its slots of each expert's tokens over its copy count (placement.py).

Tokens that are not traffic are not counted: the dispatch's padding rows (expert id -1), and — when the
group leader says which gathered rows are real (`valid_M`, set per forward by group.py) — the padding
of shorter rows in a prefill and the one-token dummy row a rank with no work runs so the collectives
line up. Without `valid_M` (TorchEngine.generate, tests) every gathered token counts.

Cost: per MoE layer one `index_add_` of the K*M slot ids into a [E + 1] int64 tensor on the ids'
device (bin 0 takes the slots that are not counted; about 3 µs on a CPU), and no host sync: the
counts are read only when asked (`window`). The ring of snapshots is a clone of the [layers, E + 1]
counts every `interval_s`, kept on the same device (window_s / interval_s + 2 of them: about 7 MB for
DeepSeek-V3's 58 MoE layers of 256 experts at the defaults).

Window: `tick` (the engine thread, each step and each idle keepalive) snapshots the cumulative counts
at most every `interval_s`; `window` subtracts the newest snapshot at least `window_s` old (or the
zeros the engine started with) from the counts now. It covers between `window_s` and
`window_s + interval_s` seconds (`span_seconds` says how many), so old traffic ages out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kubemoe_runtime.engines.torch.load.rank_weights import expert_range
from kubemoe_runtime.engines.torch.model.placement import Placement

WINDOW_S = 300.0  # five minutes of traffic
INTERVAL_S = 5.0  # the window moves in steps of this many seconds


@dataclass(frozen=True)
class Window:
    """The load over one window: `tokens[i][e]` tokens of MoE layer `layers[i]` routed to expert e, and the
    placement it is judged under (the current one)."""

    window_seconds: float
    span_seconds: float
    layers: tuple[int, ...]
    tokens: list[list[int]]
    placement: Placement

    def rank_loads(self, i: int) -> list[float]:
        """Tokens per rank in layer index `i` under the placement (a replicated expert's split among its
        copies)."""
        return self.placement.rank_loads(i, self.tokens[i])

    def imbalance(self, i: int) -> float:
        """Busiest rank's load over the mean rank load; 1.0 when the window holds no tokens."""
        loads = self.rank_loads(i)
        total = sum(loads)
        return max(loads) * len(loads) / total if total > 0 else 1.0

    def hottest_ratio(self, i: int) -> float:
        """Busiest expert's load over the mean expert load in layer index `i` (1.0 with no tokens)."""
        total = sum(self.tokens[i])
        return max(self.tokens[i]) * len(self.tokens[i]) / total if total else 1.0

    def as_json(
        self, *, pending_generation: int | None = None, error: str | None = None
    ) -> dict[str, object]:
        """GET /v1/experts/load's answer (docs/expert-load.md); `pending_generation` and `error` come from
        the group leader's placement switch (serve/placement_switch.py)."""
        p = self.placement
        blocks = [
            len(expert_range(n_experts=p.n_experts, ep_rank=r, ep_size=p.ranks)) for r in range(p.ranks)
        ]
        experts_per_rank: int | list[int] = blocks[0] if len(set(blocks)) == 1 else blocks
        return {
            "window_seconds": self.window_seconds,
            "span_seconds": round(self.span_seconds, 3),
            "layers": [
                {
                    "layer": layer,
                    "tokens": self.tokens[i],
                    "imbalance": round(self.imbalance(i), 4),
                    "slots": list(p.slots[i]),
                }
                for i, layer in enumerate(self.layers)
            ],
            "placement": {
                "ranks": p.ranks,
                # the contiguous block each rank owns without redundant slots (one per rank when they differ)
                "experts_per_rank": experts_per_rank,
                "slots_per_rank": p.slots_per_rank,
                "redundant": p.redundant,
                "generation": p.generation,
                "pending_generation": pending_generation,
                "error": error,
            },
        }


class ExpertLoad:
    """The accumulators of one rank's MoE layers and the ring of their snapshots.

    Forward side (the engine thread): `count(i, ids_MK)` from MoE layer number i, `valid_M` set before a
    forward, `tick()` between steps. Read side (any thread): `window()`.
    """

    def __init__(
        self,
        *,
        layers: Sequence[int],
        n_experts: int,
        placement: Placement,
        device: torch.device | str = "cpu",
        window_s: float = WINDOW_S,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("window_s and interval_s must be positive")
        self.layers = tuple(layers)
        self.n_experts = n_experts
        self.placement = placement  # the current one: the engine thread replaces it at a switch
        self.window_s, self.interval_s = window_s, interval_s
        self.clock = clock
        # Column 0 takes the slots that are not counted (padding: expert id -1, or not valid).
        self.counts_LE = torch.zeros(len(self.layers), n_experts + 1, dtype=torch.int64, device=device)
        self._rows = self.counts_LE.unbind(0)  # one view per layer (indexing each call costs a µs)
        self._ones = torch.ones(1024, dtype=torch.int64, device=device)
        self.valid_M: torch.Tensor | None = None  # int64 0/1 per gathered token of the next forward
        self._ring: deque[tuple[float, torch.Tensor]] = deque([(clock(), self.counts_LE.clone())])
        self._lock = threading.Lock()

    def count(self, i: int, ids_MK: torch.Tensor) -> None:
        """Add one MoE layer's gathered expert ids (-1: a padding row) to its counts. No host sync."""
        bins_MK = ids_MK + 1
        valid_M = self.valid_M
        if valid_M is not None and valid_M.shape[0] == bins_MK.shape[0]:
            bins_MK = bins_MK * valid_M[:, None]
        n = bins_MK.numel()
        if n > self._ones.numel():
            self._ones = torch.ones(2 * n, dtype=torch.int64, device=self._ones.device)
        self._rows[i].index_add_(0, bins_MK.reshape(-1), self._ones[:n])

    def tick(self) -> None:
        """Snapshot the counts if `interval_s` has passed since the last snapshot (the engine thread)."""
        now = self.clock()
        if now - self._ring[-1][0] < self.interval_s:
            return
        snapshot = self.counts_LE.clone()  # on the counts' device: no sync
        cutoff = now - self.window_s
        with self._lock:
            self._ring.append((now, snapshot))
            while len(self._ring) > 1 and self._ring[1][0] <= cutoff:
                self._ring.popleft()  # the next one is old enough to be the window's start

    def window(self, placement: Placement | None = None) -> Window:
        """Tokens per expert per layer over the last `window_s` seconds (any thread; reads the device),
        judged under `placement` (default: the current one)."""
        now = self.clock()
        current = self.counts_LE.clone()
        cutoff = now - self.window_s
        with self._lock:
            start, baseline = self._ring[0]
            for t, snapshot in self._ring:
                if t > cutoff:
                    break
                start, baseline = t, snapshot
        tokens = (current - baseline)[:, 1:].cpu().tolist()
        return Window(
            window_seconds=self.window_s,
            span_seconds=now - start,
            layers=self.layers,
            tokens=tokens,
            placement=placement or self.placement,
        )


def valid_tokens(row_lengths: Sequence[Sequence[int]], *, device: torch.device) -> torch.Tensor | None:
    """Which rows of a step's gathered tokens are traffic, in the dispatch's layout (parallel.py).

    `row_lengths[r]`: the token count of each row rank r runs (each rank pads its rows to its longest;
    a rank with none runs one dummy token). None when every gathered token is real: no rank idle and
    every row of the step as long as the others.
    """
    flat = [n for lengths in row_lengths for n in lengths]
    if all(lengths for lengths in row_lengths) and min(flat) == max(flat):
        return None
    per_rank: list[list[int]] = []
    for lengths in row_lengths:
        if not lengths:
            per_rank.append([0])  # the dummy row
            continue
        T = max(lengths)
        per_rank.append([1 if t < n else 0 for n in lengths for t in range(T)])
    n_max = max(len(mask) for mask in per_rank)
    mask = [v for part in per_rank for v in (*part, *([0] * (n_max - len(part))))]
    return torch.tensor(mask, dtype=torch.int64).to(device, non_blocking=True)
