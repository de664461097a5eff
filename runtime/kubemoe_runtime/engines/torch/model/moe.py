"""The mixture-of-experts block: route, dispatch, experts, combine, shared.

Shape suffixes: N tokens on this rank, M tokens gathered over the expert-parallel group, D hidden,
E routed experts (all, for the router; this rank's slots, for weights), F one expert's hidden size,
K experts per token.

Placement (placement.py): each rank holds S physical slots, each a copy of one logical expert. The gate
picks logical experts; `SlotRoute` says which slot computes each gathered (token, choice). A replicated
expert's pairs go to its copies in turn, in the gathered order: the j-th pair that picked expert e goes to
copy j mod c_e (copies in physical slot order). Every rank gathers the same ids, so every rank computes the
same assignment, and each pair is computed by exactly one slot in the group.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import FLOAT32_MIN_ROWS, matmul
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.expert_load import ExpertLoad
from kubemoe_runtime.engines.torch.model.layers import MLP
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement


class TopKGate(nn.Module):
    """Pick K experts per token and their weights.

    softmax (Qwen3-MoE, Mixtral): probabilities over all experts, top-K, optionally renormalised.
    sigmoid (DeepSeek-V3): independent scores; the choice adds `e_score_correction_bias` and is limited to
    the `topk_group` best of `n_group` expert groups (a group scores the sum of its two best); the weights
    are the unbiased scores of the chosen experts, renormalised and scaled by `routed_scaling_factor`.
    sigmoid_top (Llama 4): the top-K raw logits (in the weights' dtype, as transformers' router computes
    them), each weighted by its sigmoid.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.scoring, self.norm_topk_prob = cfg.scoring, cfg.norm_topk_prob
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias: nn.Parameter | None = None
        if cfg.scoring == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns expert ids [N, K] (int64) and weights [N, K] (float32)."""
        if self.scoring == "sigmoid_top":
            top_NK, ids_NK = torch.topk(matmul(x_ND, self.weight), self.top_k, dim=-1)
            return ids_NK, top_NK.float().sigmoid()
        if self.scoring == "softmax":
            probs_NE = F.softmax(matmul(x_ND, self.weight).float(), dim=-1)
            w_NK, ids_NK = torch.topk(probs_NE, self.top_k, dim=-1)
            if self.norm_topk_prob:
                w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
            return ids_NK, w_NK

        assert self.e_score_correction_bias is not None
        scores_NE = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        choice_NE = scores_NE + self.e_score_correction_bias.float()
        N = x_ND.shape[0]
        group_scores = choice_NE.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
        top_groups = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0)
        expert_mask_NE = group_mask[:, :, None].expand(N, self.n_group, self.n_experts // self.n_group)
        choice_NE = choice_NE.masked_fill(~expert_mask_NE.reshape(N, -1).bool(), float("-inf"))
        ids_NK = torch.topk(choice_NE, k=self.top_k, dim=-1, sorted=False).indices
        w_NK = scores_NE.gather(1, ids_NK)
        if self.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return ids_NK, w_NK * self.scaling


class SlotRoute:
    """Which of this rank's slots computes each gathered (token, choice) of one MoE layer.

    Three forms, fastest first: a contiguous block of experts with no copies elsewhere (the default
    placement without redundant slots: an offset), any placement without copies (a lookup table), and a
    placement with copies (a lookup, and a counter per replicated expert: module docstring).
    """

    __slots__ = ("bounded", "copies", "count", "first", "table")

    def __init__(
        self,
        *,
        count: int,
        first: int = 0,
        table: list[int] | None = None,
        copies: list[tuple[int, ...]] | None = None,
    ) -> None:
        self.count = count  # this rank's slots
        self.first = first  # contiguous form: slot j holds expert first + j
        self.table = table  # expert id -> local slot, or -1; table[-1] (padding id -1) is -1
        self.copies = copies  # expert id -> its copies' local slots in physical order, -1 on another rank
        self.bounded = True  # the table covers every expert id

    @classmethod
    def owned(cls, experts: Sequence[int], *, n_experts: int | None = None) -> SlotRoute:
        """Slot j holds `experts[j]`, and no other rank holds these experts; `n_experts`: how many the gate
        picks from (default: the table grows to the largest id it meets)."""
        if len(set(experts)) == len(experts) and list(experts) == list(
            range(experts[0], experts[0] + len(experts))
        ):
            return cls(count=len(experts), first=experts[0])
        size = (max(experts) + 1 if n_experts is None else n_experts) + 1  # the last entry: id -1
        table = [-1] * size
        for j, e in enumerate(experts):
            table[e] = j
        route = cls(count=len(experts), table=table)
        route.bounded = n_experts is not None
        return route

    @classmethod
    def of_layer(cls, placement: Placement, i: int, *, rank: int) -> SlotRoute:
        """Rank `rank`'s route in MoE layer number i of `placement`."""
        mine = placement.rank_slots(i, rank)
        if max(placement.copies(i)) == 1:
            return cls.owned(mine, n_experts=placement.n_experts)
        first = placement.first_slot(rank)
        copies: list[list[int]] = [[] for _ in range(placement.n_experts)]
        for p, e in enumerate(placement.slots[i]):
            copies[e].append(p - first if first <= p < first + len(mine) else -1)
        return cls(count=len(mine), copies=[tuple(c) for c in copies])

    def local(self, ids: Iterable[int]) -> list[int]:
        """Each flattened (token, choice)'s local slot; outside 0 .. count - 1 where another rank computes it
        (or it is a padding row, id -1)."""
        if self.copies is None:
            if self.table is None:
                first = self.first
                return [e - first for e in ids]
            table = self.table
            if not self.bounded:  # a standalone rank's view: the table grows to the largest id it meets
                ids = list(ids)
                if len(table) <= max(ids, default=0) + 1:
                    table = self.table = [*table[:-1], *[-1] * (max(ids) + 2 - len(table)), -1]
            return [table[e] for e in ids]
        copies, seen = self.copies, [0] * len(self.copies)
        local: list[int] = []
        for e in ids:
            if e < 0:
                local.append(-1)
                continue
            of_e = copies[e]
            if len(of_e) == 1:
                local.append(of_e[0])
            elif of_e:
                local.append(of_e[seen[e] % len(of_e)])
                seen[e] += 1
            else:  # no slot at all (a document cannot say so; a hand-made Placement can)
                local.append(-1)
        return local


@dataclass(frozen=True)
class StagedSlots:
    """A LocalExperts' next slots, built off the engine thread (`LocalExperts.stage`), swapped in at once."""

    experts: tuple[int, ...]
    route: SlotRoute
    w_gate_up_E2FD: torch.Tensor | None  # None: unchanged (only the route changes)
    w_down_EDF: torch.Tensor | None


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_runs(x: torch.Tensor, *sizes: int) -> bool:
    """Whether `F.grouped_mm` (torch 2.8 and later) multiplies `x`'s dtype on its device with matrices of
    these inner and outer `sizes`: on the CPU, a loop of GEMMs in C++ for float32, bf16 and float16, each
    size 16 bytes wide (its stride rule); elsewhere it has narrower rules, and the other forms serve."""
    return (
        x.device.type == "cpu"
        and x.dtype in GROUPED_MM_DTYPES
        and all(size * x.element_size() % 16 == 0 for size in sizes)
        and hasattr(F, "grouped_mm")
    )


class LocalExperts(nn.Module):
    """The routed experts of this rank's slots, stacked: slot j holds logical expert `experts[j]`; `route`
    says which slot computes each gathered (token, choice) (default: `experts` are this rank's alone).

    Gate and up projections are one matrix per expert (`w_gate_up_E2FD`: gate rows, then up rows), so an
    expert is two matmuls. The forward groups the (token, choice) slots by expert on the host (one sync),
    then runs the experts one of four ways:

        kernel    bf16 on an x86-64 CPU with AVX2 or better (kernels/moe.py): the whole layer in one C
                  call on the row-major stacks, at close to memory bandwidth at decode; up to
                  KERNEL_MAX_ROWS rows an expert on average, beyond which the looped form on those same
                  weights is faster, except on AMX tiles, which are the fastest at any row count
        grouped   on the CPU where torch's GEMM is fast in the weights' dtype (AVX-512 or AMX for bf16;
                  float32 and float16 anywhere) and its sizes are 16 bytes wide (grouped_mm_runs), up to
                  GROUPED_MAX_ROWS rows an expert: two F.grouped_mm calls over the stacks, the loop over
                  experts in C++ (bench_moe_kernel.py, bench model, 2 threads, ms a layer, grouped /
                  looped / the oneDNN-packed experts this replaced: 16 rows 10.3 / 14.6 / 13.6, 64 rows
                  13.7 / 19.2 / 20.2, 1024 rows 40.5 / 46.2 / 44.8; packed was faster only at 1-4 rows,
                  1.17 against 1.49 ms at one). Where torch's bf16 GEMM is a loop (AVX2 alone) it
                  runs too while no expert has FLOAT32_MIN_ROWS rows (decode): every expert's rows in
                  torch's bf16 loop, as transformers' experts run, without a Python op per expert (an
                  AVX2-only AMD EPYC, bench model, ms a layer, grouped / looped: 1 token 1.23 / 1.68,
                  4 tokens 4.38 / 6.03, 16 tokens 13.7 / 16.9)
        looped    each picked expert once over its contiguous block of rows (long prefills: many rows
                  each; and on a CPU whose bf16 GEMM is slow, through float32: kernels/linear.py)
        batched   off the CPU (and in float64), most experts picked, few rows each (decode at larger
                  batch): every expert's rows padded to the same count and all experts in two bmm calls,
                  instead of two small GEMMs per expert whose per-call cost dominates

    Each row's gate weight scales the expert's activations before its down projection (linear, so the same
    product, at width F instead of D); the rows go back to (token, choice) order in one gather and the K
    choices of a token are summed in one reduction (no index_add, which rounds once per choice in bf16).
    """

    # Up to this many rows an expert on average the grouped form beats the looped one (no per-expert ops from
    # Python); past it the looped form's F.linear is faster than grouped_mm's GEMMs into a shared output
    # (bench_moe_kernel.py: see the class docstring)
    GROUPED_MAX_ROWS = 128
    BATCHED_MAX_ROWS = 16  # the batched form pads every expert to the busiest one's rows: keep that small
    # From this many rows an expert on average (long prefills), oneDNN's GEMM on the same row-major weights
    # is as fast as the kernel, whose dot products cannot block loads as a GEMM does (even at 64 rows an
    # expert; at 256 the kernel takes 1.11x as long). As an AVX2 CPU (the torch path then multiplies in
    # float32) the AVX2 kernel is 1.02x that path at 64 rows an expert (bench model) and 1.49x at 32
    # (Qwen3-30B-A3B's shape): bench_moe_kernel.py, BENCH_MOE_ROWS=128,256,512, capped to AVX2
    KERNEL_MAX_ROWS = 64

    def __init__(self, *, dim: int, hidden: int, experts: Sequence[int]) -> None:
        super().__init__()
        # Logical expert of each slot: the range given (a contiguous block) until a placement is installed,
        # then a tuple. Any: callers of the contiguous form use range's `start`.
        self.experts: Any = experts
        self.route = SlotRoute.owned(experts)
        n = len(experts)
        self.w_gate_up_E2FD = nn.Parameter(torch.empty(n, 2 * hidden, dim))
        self.w_down_EDF = nn.Parameter(torch.empty(n, dim, hidden))
        self.kernel = False

    def choose_kernel(self) -> None:
        """bf16 CPU experts: the MoE kernel where it runs (on these same row-major stacks)."""
        dim, hidden = self.w_down_EDF.shape[1:]
        self.kernel = moe_kernel.load() is not None and moe_kernel.fits(dim, hidden)

    def empty_slots(self, experts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Uninitialised stacks (gate_up, down) for slots holding `experts`, for `stage` to fill; None where
        those are the slots now (staging allocates nothing for them). Any thread."""
        if tuple(experts) == tuple(self.experts):
            return None
        old_gu, old_down = self.w_gate_up_E2FD, self.w_down_EDF
        n = len(experts)
        return (
            torch.empty((n, *old_gu.shape[1:]), dtype=old_gu.dtype, device=old_gu.device),
            torch.empty((n, *old_down.shape[1:]), dtype=old_down.dtype, device=old_down.device),
        )

    def slot_bytes(self) -> int:
        """The bytes of one slot's expert (gate_up and down) in these stacks."""
        return sum(w[0].numel() * w.element_size() for w in (self.w_gate_up_E2FD, self.w_down_EDF))

    def staging_bytes(self, experts: Sequence[int]) -> int:
        """The bytes `empty_slots(experts)` allocates."""
        return 0 if tuple(experts) == tuple(self.experts) else len(experts) * self.slot_bytes()

    def stage(
        self,
        experts: Sequence[int],
        route: SlotRoute,
        fresh: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
        *,
        stacks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> StagedSlots:
        """The next slots, slot j holding `experts[j]`: copied from the slot that holds it now, or from
        `fresh[e]` (gate_up [2F, D] and down [D, F], any dtype) for an expert new here, into `stacks` (from
        `empty_slots`; made here if None). A fresh expert already in its place there (read straight into
        it) is not copied again. Any thread: it only reads this module. Unchanged slots keep their weights
        (only the route is new)."""
        experts = tuple(experts)
        if experts == tuple(self.experts):
            return StagedSlots(experts, route, None, None)
        held: dict[int, int] = {}
        for j, e in enumerate(self.experts):
            held.setdefault(e, j)
        old_gu, old_down = self.w_gate_up_E2FD.detach(), self.w_down_EDF.detach()
        stacks = stacks or self.empty_slots(experts)
        assert stacks is not None  # the slots change
        gate_up, down = stacks
        with torch.no_grad():
            for j, e in enumerate(experts):
                source = (old_gu[held[e]], old_down[held[e]]) if e in held else fresh[e]
                for dest, src in zip((gate_up[j], down[j]), source, strict=True):
                    if dest.data_ptr() != src.data_ptr() or dest.dtype != src.dtype:
                        dest.copy_(src)
        return StagedSlots(experts, route, gate_up, down)

    def install(self, staged: StagedSlots) -> None:
        """Swap staged slots in (the engine thread, between forwards): references only, no copy."""
        if staged.w_gate_up_E2FD is not None and staged.w_down_EDF is not None:
            self.w_gate_up_E2FD = nn.Parameter(staged.w_gate_up_E2FD, requires_grad=False)
            self.w_down_EDF = nn.Parameter(staged.w_down_EDF, requires_grad=False)
        self.experts = staged.experts
        self.route = staged.route

    def forward(self, x_MD: torch.Tensor, ids_MK: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
        """Partial output: the weighted sum over this rank's slots (zero rows where none was picked)."""
        M, K = ids_MK.shape
        E = self.route.count
        # Slot s = token * K + choice (here "slot" is such a pair; the experts' slots are "local"). Grouped
        # by local expert slot on the host — one sync, and fewer ops than a sort on the device for decode's
        # few pairs; pairs other ranks compute drop out.
        local = self.route.local(itertools.chain.from_iterable(ids_MK.tolist()))
        slots = sorted((s for s, e in enumerate(local) if 0 <= e < E), key=local.__getitem__)
        if not slots:
            return x_MD.new_zeros(M, x_MD.shape[1])
        counts = [0] * E
        for s in slots:
            counts[local[s]] += 1
        chosen = [e for e, n in enumerate(counts) if n]
        if self.kernel and (len(slots) < self.KERNEL_MAX_ROWS * len(chosen) or moe_kernel.tiles()):
            starts = [0, *itertools.accumulate(counts[e] for e in chosen)]
            return moe_kernel.routed_experts(
                x_MD.contiguous(), self.w_gate_up_E2FD, self.w_down_EDF, w_MK,
                slots=slots, experts=chosen, starts=starts,
            )  # fmt: skip
        owned = torch.tensor(slots, device=x_MD.device)
        x_sD = x_MD.index_select(0, owned // K)  # index_select: advanced indexing is 4x slower on CPU
        w_s = w_MK.flatten().index_select(0, owned)
        fast_gemm = moe_kernel.fast_bf16_gemm() or x_MD.dtype != torch.bfloat16  # else bf16 is a slow loop
        busiest = max(counts)
        # With a slow bf16 GEMM, an expert's few rows (decode) run torch's bf16 loop: grouped, from C++
        if (fast_gemm or busiest < FLOAT32_MIN_ROWS) and grouped_mm_runs(x_MD, *self.w_down_EDF.shape[1:]):
            grouped = len(slots) <= self.GROUPED_MAX_ROWS * len(chosen)
            out_sD = self._grouped(x_sD, w_s, counts) if grouped else self._looped(x_sD, w_s, counts)
        elif fast_gemm and 2 * len(chosen) >= E and busiest <= self.BATCHED_MAX_ROWS:
            out_sD = self._batched(x_sD, w_s, torch.tensor([local[s] for s in slots]), counts)
        else:
            out_sD = self._looped(x_sD, w_s, counts)
        if len(slots) == M * K:  # every pair computed here: back to (token, choice) order
            back = torch.empty_like(owned)
            back[owned] = torch.arange(M * K, device=owned.device)
            y_SD = out_sD.index_select(0, back)
        else:  # pairs other ranks compute are zero rows here
            y_SD = out_sD.new_zeros(M * K, out_sD.shape[1]).index_copy_(0, owned, out_sD)
        return y_SD.view(M, K, -1).sum(dim=1)

    @staticmethod
    def _weigh(act_nF: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
        """An expert's activations times each row's gate weight, rounded once to their dtype: the down
        projection is linear, so this weighs its output (at width F instead of D) with no pass of its own
        over the outputs."""
        return (act_nF * w_n[:, None]).to(act_nF.dtype)

    def _looped(self, x_sD: torch.Tensor, w_s: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, `counts[e]` rows for local expert e, `w_s` their gate weights: each picked
        expert on its block, its activations weighted (`_weigh`)."""
        picked = [local for local, n in enumerate(counts) if n]
        sizes = [counts[e] for e in picked]
        outputs: list[torch.Tensor] = []
        blocks = zip(picked, torch.split(x_sD, sizes), torch.split(w_s, sizes), strict=True)
        for local, rows_nD, w_n in blocks:
            gate_nF, up_nF = matmul(rows_nD, self.w_gate_up_E2FD[local]).chunk(2, dim=-1)
            outputs.append(matmul(self._weigh(F.silu(gate_nF) * up_nF, w_n), self.w_down_EDF[local]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _grouped(self, x_sD: torch.Tensor, w_s: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The same in two grouped GEMMs over the stacked row-major weights (F.grouped_mm): no per-expert
        op from Python, no padding."""
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32)
        gate_sF, up_sF = F.grouped_mm(x_sD, self.w_gate_up_E2FD.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        act_sF = self._weigh(F.silu(gate_sF) * up_sF, w_s)
        out_sD: torch.Tensor = F.grouped_mm(act_sF, self.w_down_EDF.transpose(1, 2), offs=offs)
        return out_sD

    def _batched(
        self, x_sD: torch.Tensor, w_s: torch.Tensor, expert_s: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """The same, as two bmm calls over every local expert, rows padded to the busiest expert's R."""
        E, R = len(counts), max(counts)
        starts_E = torch.tensor([0, *counts[:-1]]).cumsum(0)
        row_s = torch.arange(x_sD.shape[0]) - starts_E[expert_s]  # each slot's row within its expert
        x_ERD = x_sD.new_zeros(E, R, x_sD.shape[1])
        x_ERD[expert_s, row_s] = x_sD
        w_ER = w_s.new_zeros(E, R)
        w_ER[expert_s, row_s] = w_s
        gate_ERF, up_ERF = torch.bmm(x_ERD, self.w_gate_up_E2FD.transpose(1, 2)).chunk(2, dim=-1)
        act_ERF = self._weigh((F.silu(gate_ERF) * up_ERF).flatten(0, 1), w_ER.flatten()).view(E, R, -1)
        out_ERD = torch.bmm(act_ERF, self.w_down_EDF.transpose(1, 2))
        return out_ERD[expert_s, row_s]


class MoE(nn.Module):
    """Route, dispatch, experts, combine, shared (parallel.py). With `load` set (TorchEngine does), each
    forward adds the gathered expert ids — the whole group's routing, every logical expert — to the
    layer's counts `load_index` (expert_load.py): one scatter_add_ on the device, no sync.

    Llama 4 (`expert_input_weighted`) weighs an expert's input, expert(w * x), where the others weigh its
    output, w * expert(x): each gathered (token, choice) becomes a row of its own, scaled by its weight,
    and the experts run on those rows with weight 1 (exact), one choice a row (for K = 1 the same rows).
    """

    def __init__(
        self, cfg: ModelConfig, *, ep: ExpertParallel, placement: Placement | None = None, layer: int = 0
    ) -> None:
        """This rank's slots of decoder layer `layer` in `placement` (default: its contiguous block)."""
        super().__init__()
        self.ep = ep
        self.load: ExpertLoad | None = None
        self.load_index = 0
        self.router = TopKGate(cfg)
        self.input_weighted = cfg.expert_input_weighted
        dim, hidden = cfg.hidden_size, cfg.moe_intermediate_size
        if placement is None:
            self.experts = LocalExperts(dim=dim, hidden=hidden, experts=ep.experts(cfg.n_routed_experts))
        else:
            i = placement.layers.index(layer)
            self.experts = LocalExperts(dim=dim, hidden=hidden, experts=placement.rank_slots(i, ep.rank))
            self.experts.route = SlotRoute.of_layer(placement, i, rank=ep.rank)
        self.shared = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        # 1. route: every rank routes its own tokens.
        ids_NK, w_NK = self.router(x_ND)
        # 2. dispatch: all ranks' tokens, padded to the same count per rank.
        x_MD, ids_MK, w_MK, rows_per_rank = self.ep.dispatch(x_ND, ids_NK, w_NK)
        if self.load is not None:  # the gathered ids: every rank's tokens, so every logical expert's load
            self.load.count(self.load_index, ids_MK)
        # 3. experts: this rank's experts over every gathered token.
        y_MD = (
            self._weighted_input(x_MD, ids_MK, w_MK)
            if self.input_weighted
            else self.experts(x_MD, ids_MK, w_MK)
        )
        # 4. combine: sum the ranks' partial outputs, keep this rank's rows.
        y_ND = self.ep.combine(y_MD, rows_per_rank=rows_per_rank, n_local=B * T)
        # 5. shared: experts every token goes through, computed locally.
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND.view(B, T, D)

    def _weighted_input(self, x_MD: torch.Tensor, ids_MK: torch.Tensor, w_MK: torch.Tensor) -> torch.Tensor:
        """The experts on their weighted inputs (class docstring); each weight rounded to the activations'
        dtype first, as transformers' Llama4TextMoe does."""
        M, K = ids_MK.shape
        x_SD = (x_MD[:, None, :] * w_MK.to(x_MD.dtype)[:, :, None]).reshape(M * K, -1)
        ones_S1 = torch.ones(M * K, 1, dtype=w_MK.dtype, device=w_MK.device)
        y_SD: torch.Tensor = self.experts(x_SD, ids_MK.reshape(M * K, 1), ones_S1)
        return y_SD.view(M, K, -1).sum(dim=1)
