"""Load a checkpoint for one expert-parallel rank and run it: teacher-forced logits, greedy generation.

The rank's routed experts follow a placement (placement.py): at load, and later by `stage_placement`
(any thread: reads the experts newly held here from the checkpoint, builds the next slots) and
`apply_placement` (the engine thread, between forwards: swaps them in). Every rank of a group must apply
the same placement before the same forward (serve/group.py does that). Staging holds the next stacks of
every MoE layer whose slots change beside the current ones, `staging_bytes` (up to a second copy of the
rank's experts), until the switch; serve/placement_switch.py checks the pod has that memory first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kubemoe_runtime.engines.torch.load.checkpoint_tensors import routed_expert_names
from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import (
    load_expert_tensors,
    plan_rank_weights,
    read_planned,
)
from kubemoe_runtime.engines.torch.load.tensor_reads import LoadCancelled
from kubemoe_runtime.engines.torch.load.weight_map import (
    expert_stacks,
    qkv_weights,
    routed_expert_weights,
    to_engine_state_dict,
)
from kubemoe_runtime.engines.torch.load.weight_plan import LoadReport
from kubemoe_runtime.engines.torch.model.allocator import keep_freed_memory, release_freed_memory
from kubemoe_runtime.engines.torch.model.decoder import Transformer
from kubemoe_runtime.engines.torch.model.expert_load import ExpertLoad
from kubemoe_runtime.engines.torch.model.moe import MoE, SlotRoute, StagedSlots
from kubemoe_runtime.engines.torch.model.packing import pack_model
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement, default_placement
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams, sample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The weight dtypes the engine runs, by --dtype name (pod/settings.py's DTYPE_NAMES)."""


class PlacementCancelled(Exception):
    """`stage_placement` stopped because its caller no longer wants the result."""


@dataclass(frozen=True)
class StagedPlacement:
    """A placement's slots for this rank, ready to swap in (`TorchEngine.apply_placement`)."""

    placement: Placement
    layers: tuple[StagedSlots, ...]  # one per MoE layer, in order
    fresh_bytes: int  # routed-expert bytes read from the checkpoint for it


def moe_layer_indexes(cfg: ModelConfig) -> list[int]:
    return [i for i, moe in enumerate(cfg.moe_layers) if moe]


class TorchEngine:
    """One rank's model. With expert parallelism every rank must make the same sequence of forward calls
    (the MoE layers run collectives), though each may pass its own tokens. `expert_load` counts the
    tokens its MoE layers route to each expert (expert_load.py); `placement` is where the group's
    experts are now."""

    def __init__(
        self,
        model: Transformer,
        *,
        ep: ExpertParallel,
        dtype: torch.dtype,
        load_report: LoadReport,
        placement: Placement | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.cfg = model.cfg
        self.ep = ep
        self.dtype = dtype
        self.load_report = load_report
        self.model_dir = model_dir
        self.placement = placement or default_placement(
            n_experts=self.cfg.n_routed_experts, ranks=ep.size, layers=moe_layer_indexes(self.cfg)
        )
        self.expert_load = self._count_expert_load()

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(decoder layer index, MoE block) of every MoE layer, in order."""
        return [(i, block.ffn) for i, block in enumerate(self.model.blocks()) if isinstance(block.ffn, MoE)]

    def _count_expert_load(self) -> ExpertLoad:
        """One ExpertLoad over every MoE layer, attached to each (it counts from their next forward)."""
        moe = self.moe_layers()
        load = ExpertLoad(
            layers=[i for i, _ in moe],
            n_experts=self.cfg.n_routed_experts,
            placement=self.placement,
            device=self.model.embed.weight.device,
        )
        for index, (_, layer) in enumerate(moe):
            layer.load, layer.load_index = load, index
        return load

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        *,
        dtype: torch.dtype = torch.bfloat16,
        ep: ExpertParallel | None = None,
        pack: bool = True,
        placement: Placement | None = None,
        progress: LoadProgress | None = None,
    ) -> TorchEngine:
        """Load this rank's weights: its slots of `placement` (default: its contiguous block of experts);
        with `pack`, bf16 weights on a CPU that supports it are packed for its matmuls (packing.py).
        `progress` counts the bytes read (load/load_progress.py). Sets this process's malloc to keep freed
        memory for the next forward (allocator.py)."""
        keep_freed_memory()
        ep = ep or ExpertParallel()
        cfg = ModelConfig.load(model_dir)
        layers = moe_layer_indexes(cfg)
        placement = placement or default_placement(
            n_experts=cfg.n_routed_experts, ranks=ep.size, layers=layers
        )
        _check_fits(placement, cfg=cfg, ep=ep)
        slots = {layer: placement.rank_slots(i, ep.rank) for i, layer in enumerate(layers)}
        # Every header this rank needs is checked against config.json before anything is allocated from
        # its sizes: a config that disagrees with its checkpoint fails here, naming the shard and tensor.
        plan = plan_rank_weights(model_dir, cfg=cfg, ep_rank=ep.rank, ep_size=ep.size, slots=slots)
        # Experts are read straight into the stacked parameters, and q, k and v into the fused qkv_proj
        # (sized from the checked headers), when no dtype conversion is needed. Every other tensor is read
        # into memory of its own (tensor_reads.py): after the load no weight is held twice.
        stacks: dict[str, torch.Tensor] = {}
        places: dict[str, torch.Tensor] = {}
        if getattr(torch, cfg.dtype, None) == dtype:
            for made, where in (
                expert_stacks(plan.shapes(), experts=slots, dtype=dtype),
                qkv_weights(plan.shapes(), cfg=cfg, dtype=dtype),
            ):
                stacks.update(made)
                places.update(where)
        tensors, report = read_planned(plan, into=places, progress=progress)
        state = to_engine_state_dict(tensors, cfg=cfg, experts=slots, dtype=dtype, stacks=stacks)
        del tensors, stacks, places  # the state holds what the model keeps; the rest goes with these
        with torch.device("meta"):
            model = Transformer(cfg, ep=ep, placement=placement)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.eval()
        if pack:
            pack_model(model)
        release_freed_memory()  # the load's temporaries: not kept for the forwards
        return cls(
            model, ep=ep, dtype=dtype, load_report=report, placement=placement, model_dir=Path(model_dir)
        )

    def _staging(self, placement: Placement) -> list[tuple[int, MoE, tuple[int, ...], list[int]]]:
        """For each MoE layer: (layer index, block, its slot experts in `placement`, those new here)."""
        _check_fits(placement, cfg=self.cfg, ep=self.ep)
        staging = []
        for i, (layer, block) in enumerate(self.moe_layers()):
            slots = tuple(placement.rank_slots(i, self.ep.rank))
            staging.append((layer, block, slots, sorted(set(slots) - set(block.experts.experts))))
        return staging

    def _reads_into_place(self) -> bool:
        """Whether new experts are read straight into the staged stacks: a checkpoint in the engine's dtype,
        one tensor per projection (not Llama 4's fused pieces, which are transposed into place)."""
        return not self.cfg.fused_experts and getattr(torch, self.cfg.dtype, None) == self.dtype

    def staging_bytes(self, placement: Placement) -> int:
        """The memory `stage_placement(placement)` allocates on this rank, allocating nothing: the next
        stacks of every MoE layer whose slots change here, and, where new experts cannot be read straight
        into them (`_reads_into_place`), every new expert as read (in the checkpoint's dtype, all read
        before any is placed) and one of them at a time as made contiguous (gate and up concatenated,
        Llama 4's pieces transposed) before it is copied, converted, into its slots."""
        total = largest = 0
        apart = not self._reads_into_place()
        for _, block, slots, new in self._staging(placement):
            total += block.experts.staging_bytes(slots)
            if apart and new:
                read = block.experts.slot_bytes() * self._stored_itemsize() // self.dtype.itemsize
                total += len(new) * read
                largest = max(largest, read)
        return total + largest

    def _stored_itemsize(self) -> int:
        """Bytes an element of the checkpoint's experts takes (its config's dtype; else the engine's)."""
        stored = getattr(torch, self.cfg.dtype, None)
        return stored.itemsize if isinstance(stored, torch.dtype) else self.dtype.itemsize

    def stage_placement(
        self, placement: Placement, *, cancelled: Callable[[], bool] = lambda: False
    ) -> StagedPlacement:
        """This rank's slots of `placement`, built without touching the running model (any thread): the
        experts it newly holds are read from the checkpoint (WeightLoadError if they cannot be), straight
        into the next stacks where they can be, the others copied from the slots holding them now. It
        allocates `staging_bytes(placement)` (a second copy of each MoE layer whose slots change here,
        until the switch frees the old one). Raises PlacementCancelled once `cancelled()` is true."""
        staging = self._staging(placement)
        if self.model_dir is None:
            raise ValueError(
                "this engine was not loaded from a checkpoint folder: it cannot read new experts"
            )
        stacks = {layer: block.experts.empty_slots(slots) for layer, block, slots, _ in staging}
        places: dict[str, torch.Tensor] = {}  # a new expert's tensors' places in its first slot
        for layer, _, slots, new in staging:
            layer_stacks = stacks[layer]
            if layer_stacks is None or not self._reads_into_place():
                continue
            gate_up, down = layer_stacks
            for e in new:
                j = slots.index(e)
                gate, up, down_name = routed_expert_names(self.cfg, layer, e)
                places[gate], places[up] = gate_up[j].chunk(2)
                places[down_name] = down[j]
        try:  # cancelled between reads too: an abandoned generation stops reading early
            tensors, report = load_expert_tensors(
                self.model_dir,
                cfg=self.cfg,
                experts={layer: new for layer, _, _, new in staging if new},
                into=places,
                cancelled=cancelled,
            )
        except LoadCancelled as err:
            raise PlacementCancelled from err
        staged = []
        for i, (layer, block, slots, new) in enumerate(staging):
            if cancelled():
                raise PlacementCancelled
            layer_stacks, fresh = stacks[layer], {}
            for e in new:
                names = routed_expert_names(self.cfg, layer, e)
                if layer_stacks is not None and all(tensors[n] is places.get(n) for n in names):
                    j = slots.index(e)  # read into its first slot: stage copies it to any other
                    fresh[e] = (layer_stacks[0][j], layer_stacks[1][j])
                else:
                    fresh[e] = routed_expert_weights(tensors, cfg=self.cfg, layer=layer, expert=e)
            route = SlotRoute.of_layer(placement, i, rank=self.ep.rank)
            staged.append(block.experts.stage(slots, route, fresh, stacks=stacks[layer]))
        return StagedPlacement(
            placement=placement, layers=tuple(staged), fresh_bytes=report.routed_expert_bytes
        )

    def apply_placement(self, staged: StagedPlacement) -> None:
        """Swap staged slots in (the engine thread, between forwards; every rank before the same forward)."""
        moe = self.moe_layers()
        if len(staged.layers) != len(moe):
            raise ValueError(f"staged {len(staged.layers)} MoE layers, the model has {len(moe)}")
        for (_, block), slots in zip(moe, staged.layers, strict=True):
            block.experts.install(slots)
        self.placement = staged.placement
        self.expert_load.placement = staged.placement

    @torch.inference_mode()
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits [T, V] in float32 for one sequence starting at position 0."""
        tokens_BT = torch.tensor([list(tokens)], dtype=torch.int64)
        pos_BT = torch.arange(len(tokens))[None]
        logits_BTV: torch.Tensor = self.model(tokens_BT, pos_BT=pos_BT)
        return logits_BTV[0].float()

    def generate_greedy(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_token_ids: Sequence[int] = ()
    ) -> list[list[int]]:
        return self.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        sampling: Sequence[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """Continue each prompt with a KV cache: one batched prefill, then batched decode steps.

        Prompts may differ in length: each is prefilled at its own positions (shorter rows are padded at
        the end and their padding is overwritten before anyone attends to it). A row stops at a stop token.
        `sampling` gives each row its own parameters and seeded generator (default: greedy).
        """
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        cache = self.model.new_cache(slots=B, max_len=max(lengths) + max_new_tokens, dtype=self.dtype)
        T = max(lengths)
        tokens_BT = torch.zeros((B, T), dtype=torch.int64)
        pos_BT = torch.zeros((B, T), dtype=torch.int64)
        for b, prompt in enumerate(prompts):
            tokens_BT[b, : lengths[b]] = torch.tensor(list(prompt))
            # Padding repeats the last real position: it writes (then is overwritten) at that row's next slot.
            pos_BT[b] = torch.arange(T).clamp(max=lengths[b])
        # Logits only at each row's last prompt token: the LM head over every prompt position is wasted work.
        logits_B1V = self.model(tokens_BT, pos_BT=pos_BT, cache=cache, logits_at_B=torch.tensor(lengths) - 1)
        params = list(sampling) if sampling is not None else [SamplingParams()] * B
        generators = [p.generator() for p in params]

        def choose(logits_BV: torch.Tensor) -> torch.Tensor:
            return torch.tensor([sample(logits_BV[b], params[b], generators[b]) for b in range(B)])

        next_B = choose(logits_B1V[:, 0])

        outputs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        position_B = torch.tensor(lengths)
        for step in range(max_new_tokens):
            for b in range(B):
                if not done[b]:
                    outputs[b].append(int(next_B[b]))
                    done[b] = int(next_B[b]) in stop_token_ids
            if all(done) or step == max_new_tokens - 1:
                break
            logits_BTV = self.model(next_B[:, None], pos_BT=position_B[:, None], cache=cache)
            next_B = choose(logits_BTV[:, -1])
            position_B = position_B + 1
        return outputs


def _check_fits(placement: Placement, *, cfg: ModelConfig, ep: ExpertParallel) -> None:
    """ValueError for a placement made for another model or group."""
    layers = tuple(moe_layer_indexes(cfg))
    if (
        placement.n_experts != cfg.n_routed_experts
        or placement.ranks != ep.size
        or placement.layers != layers
    ):
        raise ValueError(
            f"the placement is for {placement.n_experts} experts over {placement.ranks} ranks in MoE "
            f"layers {list(placement.layers)}; this group has {cfg.n_routed_experts} over {ep.size} in "
            f"{list(layers)}"
        )
