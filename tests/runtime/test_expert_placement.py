"""Expert placement on one rank (model/placement.py, moe.py's SlotRoute, the loader by slot): the document's
checks, the default the operator also computes, the split among copies, and what a rank reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemoe_operator.plan.experts import default_slots
from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load.checkpoint_files import WeightLoadError
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import load_rank_weights
from kubemoe_runtime.engines.torch.model.moe import LocalExperts, SlotRoute
from kubemoe_runtime.engines.torch.model.placement import (
    Placement,
    PlacementError,
    default_placement,
    parse_placement,
    read_placement_file,
)

E, R, N = 8, 2, 2  # experts, ranks, redundant slots: S = 5 slots a rank
LAYERS = (1, 2)
PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "generation": 3,
        "ranks": R,
        "slotsPerRank": (E + N) // R,
        "layers": [
            {"layer": 1, "slots": [7, 6, 5, 4, 0, 3, 2, 1, 0, 7]},
            {"layer": 2, "slots": [0, 1, 2, 3, 0, 4, 5, 6, 7, 4]},
        ],
        "comment": "unknown keys are ignored",
    }
    doc.update(changes)
    return doc


def parse(doc: Any) -> Placement:
    return parse_placement(doc, n_experts=E, ranks=R, layers=LAYERS, redundant=N)


def test_a_valid_document_parses() -> None:
    placement = parse(document())
    assert placement.generation == 3
    assert placement.rank_sizes == (5, 5)
    assert placement.rank_slots(0, 1) == (3, 2, 1, 0, 7)
    assert placement.copies(1) == [2, 1, 1, 1, 2, 1, 1, 1]
    assert placement.document()["layers"] == document()["layers"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"ranks": 4}, "ranks", "this group has 2"),
        ({"slotsPerRank": 4}, "slotsPerRank", "5 slots"),
        ({"generation": -1}, "generation", "must be in"),
        ({"generation": 1.0}, "generation", "must be an integer"),
        ({"generation": True}, "generation", "must be an integer"),
        ({"generation": None}, "generation", "must be an integer"),
        ({"ranks": "2"}, "ranks", "must be an integer"),
        ({"layers": {"1": []}}, "layers", "must be a list"),
        ({"layers": [{"layer": 1, "slots": [0] * 10}]}, "layers[0].slots", "have no slot"),
        ({"layers": [{"layer": 1, "slots": [*range(8), 0, 0]}]}, "layers", "[2] are missing"),
        ({"layers": [{"layer": 0, "slots": []}]}, "layers[0].layer", "not a MoE layer"),
        ({"layers": [{"layer": 9, "slots": []}]}, "layers[0].layer", "not a MoE layer"),
        ({"layers": ["x"]}, "layers[0]", "must be an object"),
        ({"layers": [{"layer": 1.5, "slots": []}]}, "layers[0].layer", "must be an integer"),
        ({"layers": [{"layer": 1, "slots": "01234567"}]}, "layers[0].slots", "must be a list"),
        ({"layers": [{"layer": 1, "slots": list(range(8))}]}, "layers[0].slots", "has 8 entries"),
        ({"layers": [{"layer": 1, "slots": [*range(8), 0, 8]}]}, "layers[0].slots[9]", "not an expert id"),
        ({"layers": [{"layer": 1, "slots": [*range(8), 0, -1]}]}, "layers[0].slots[9]", "not an expert id"),
        (
            {"layers": [{"layer": 1, "slots": [*range(8), 0, 1.0]}]},
            "layers[0].slots[9]",
            "must be an integer",
        ),
    ],
)
def test_a_bad_document_names_the_field(change: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(PlacementError) as caught:
        parse(document(**change))
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


def test_a_repeated_layer_is_refused() -> None:
    doc = document()
    doc["layers"].append(doc["layers"][0])
    with pytest.raises(PlacementError, match=r"layers\[2\]\.layer: layer 1 is listed twice"):
        parse(doc)


@pytest.mark.parametrize("doc", [[1, 2], "placement", 3, None])
def test_a_document_that_is_no_object_is_refused(doc: Any) -> None:
    with pytest.raises(PlacementError, match=r"^\(document\): must be a JSON object"):
        parse(doc)


def test_a_group_whose_slots_do_not_divide_takes_no_document() -> None:
    with pytest.raises(PlacementError, match="do not divide evenly"):
        parse_placement(document(), n_experts=9, ranks=2, layers=LAYERS, redundant=0)


@settings(max_examples=100, deadline=None)
@given(
    ranks=st.sampled_from([1, 2, 4, 8]),
    block=st.integers(min_value=1, max_value=8),
    extra=st.integers(min_value=0, max_value=6),
)
def test_the_default_is_the_operators(ranks: int, block: int, extra: int) -> None:
    n_experts, redundant = ranks * block, ranks * extra
    if redundant > n_experts * (ranks - 1):
        with pytest.raises(ValueError, match="--redundant-experts"):
            default_placement(n_experts=n_experts, ranks=ranks, layers=[0], redundant=redundant)
        return
    placement = default_placement(n_experts=n_experts, ranks=ranks, layers=[0, 3], redundant=redundant)
    expected = default_slots(n_experts, ranks, redundant)
    assert placement.slots == (expected, expected)
    assert placement.rank_sizes == ((n_experts + redundant) // ranks,) * ranks


def test_the_default_without_redundant_slots_takes_uneven_blocks() -> None:
    placement = default_placement(n_experts=10, ranks=4, layers=[0])
    assert placement.rank_sizes == (3, 3, 2, 2)
    assert placement.slots == (tuple(range(10)),)


def test_bad_redundant_counts_name_the_flag() -> None:
    for redundant, words in ((3, "not a multiple of the 2"), (10, "exceeds 8"), (-2, "negative")):
        with pytest.raises(ValueError, match=f"--redundant-experts.*{words}"):
            default_placement(n_experts=8, ranks=2, layers=[1], redundant=redundant)


def test_the_file_at_start(tmp_path: Path) -> None:
    shape: dict[str, Any] = {"n_experts": E, "ranks": R, "layers": LAYERS, "redundant": N}
    missing = read_placement_file(tmp_path / "none.json", **shape)
    assert missing == default_placement(**shape)  # the ConfigMap is optional: no file, the default
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(document()))
    assert read_placement_file(path, **shape) == parse(document())
    path.write_text(json.dumps(document(slotsPerRank=4)))
    with pytest.raises(PlacementError, match=rf"^slotsPerRank: {path}: is 4"):
        read_placement_file(path, **shape)
    path.write_text("{not json")
    with pytest.raises(PlacementError, match=rf"^\(file\): {path}: not a JSON placement document"):
        read_placement_file(path, **shape)


def test_a_replicated_experts_pairs_go_to_its_copies_in_turn() -> None:
    # Layer slots over two ranks of 3: expert 0 on both ranks, expert 3 twice on rank 1.
    placement = Placement(
        generation=1, n_experts=4, rank_sizes=(3, 3), layers=(0,), slots=((0, 1, 2, 0, 3, 3),)
    )
    routes = [SlotRoute.of_layer(placement, 0, rank=r) for r in range(2)]
    ids = [0, 3, 0, 1, 3, 0, -1, 3, 0, 2, 3]  # flattened (token, choice) pairs; -1 a padding row
    local = [route.local(ids) for route in routes]
    assert local[0] == [0, -1, -1, 1, -1, 0, -1, -1, -1, 2, -1]  # expert 0: pairs 1 and 3 of its 4 here
    assert local[1] == [-1, 1, 0, -1, 2, -1, -1, 1, 0, -1, 2]  # the others; expert 3 alternates its copies
    for s, e in enumerate(ids):  # each pair is computed exactly once in the group (padding: nowhere)
        here = sum(0 <= route_local[s] < 3 for route_local in local)
        assert here == (0 if e < 0 else 1)


def test_the_contiguous_route_is_the_original_offset() -> None:
    route = SlotRoute.owned(range(4, 8))
    assert route.table is None
    assert route.copies is None
    assert route.local([5, -1, 2, 7]) == [1, -5, -2, 3]  # out of 0..3: not here


def _experts(slots: tuple[int, ...], weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> LocalExperts:
    block = LocalExperts(dim=16, hidden=8, experts=slots)
    with torch.no_grad():
        for j, e in enumerate(slots):
            block.w_gate_up_E2FD[j].copy_(weights[e][0])
            block.w_down_EDF[j].copy_(weights[e][1])
    return block


def _reference(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, weights: dict[int, Any]) -> torch.Tensor:
    y = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate_up, down = weights[int(ids[m, k])]
            gate, up = (gate_up @ x[m]).chunk(2)
            y[m] += w[m, k] * (down @ (F.silu(gate) * up))
    return y


def test_ranks_with_copies_sum_to_every_experts_output() -> None:
    """Two ranks' LocalExperts under a placement with copies: their partial outputs sum to the reference,
    staged and installed from the contiguous layout as a live switch does."""
    gen = torch.Generator().manual_seed(0)
    weights = {e: (torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)) for e in range(4)}
    x = torch.randn(12, 16, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(12)])
    w = torch.rand(12, 2, generator=gen)
    placement = Placement(
        generation=1, n_experts=4, rank_sizes=(3, 3), layers=(0,), slots=((3, 0, 1, 0, 2, 3),)
    )
    start = default_placement(n_experts=4, ranks=2, layers=[0], redundant=2)  # (0, 1, 0 | 2, 3, 2)
    partials = []
    for rank in range(2):
        block = _experts(start.rank_slots(0, rank), weights)
        block.route = SlotRoute.of_layer(start, 0, rank=rank)
        fresh = {e: weights[e] for e in set(placement.rank_slots(0, rank)) - set(block.experts)}
        block.install(
            block.stage(placement.rank_slots(0, rank), SlotRoute.of_layer(placement, 0, rank=rank), fresh)
        )
        assert tuple(block.experts) == placement.rank_slots(0, rank)
        with torch.no_grad():
            partials.append(block(x, ids, w))
    torch.testing.assert_close(
        partials[0] + partials[1], _reference(x, ids, w, weights), atol=1e-4, rtol=1e-4
    )


def test_a_rank_reads_its_slots_experts_once_each(checkpoints: dict[str, Path]) -> None:
    ckpt = checkpoints["qwen3_moe"]
    cfg = ModelConfig.load(ckpt)
    one_expert = 3 * 64 * 32 * 2  # gate, up, down of 32 x 64 in bf16
    slots = {1: (5, 2, 5, 7), 2: (0, 0, 0, 1)}
    tensors, report = load_rank_weights(ckpt, cfg=cfg, ep_rank=0, ep_size=2, slots=slots)
    assert report.routed_expert_bytes == (3 + 2) * one_expert  # expert 5 and expert 0: read once
    assert report.experts == (0, 1, 2, 5, 7)
    routed = {n for n in tensors if ".experts." in n and "shared" not in n}
    assert {n.split(".experts.")[0] + "." + n.split(".")[5] for n in routed} == {
        "model.layers.1.mlp.5", "model.layers.1.mlp.2", "model.layers.1.mlp.7",
        "model.layers.2.mlp.0", "model.layers.2.mlp.1",
    }  # fmt: skip


def test_an_engine_on_a_placement_holds_its_slots_and_matches_the_default(
    checkpoints: dict[str, Path],
) -> None:
    ckpt = checkpoints["mixtral"]
    plain = TorchEngine.load(ckpt, dtype=torch.float32)
    layers = plain.placement.layers
    placement = Placement(
        generation=4,
        n_experts=8,
        rank_sizes=(10,),
        layers=layers,
        slots=((7, 6, 5, 4, 3, 2, 1, 0, 6, 6),) * len(layers),
    )
    placed = TorchEngine.load(ckpt, dtype=torch.float32, placement=placement)
    for _, block in placed.moe_layers():
        assert tuple(block.experts.experts) == (7, 6, 5, 4, 3, 2, 1, 0, 6, 6)
        assert block.experts.w_down_EDF.shape[0] == 10
    assert placed.expert_load.window().placement.generation == 4
    torch.testing.assert_close(placed.logits(PROMPT), plain.logits(PROMPT), atol=1e-5, rtol=0)
    assert placed.generate([PROMPT], max_new_tokens=6) == plain.generate([PROMPT], max_new_tokens=6)


def test_staging_reads_only_the_experts_new_here_and_fails_by_file(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], ckpt)
    layers = TorchEngine.load(ckpt, dtype=torch.float32).placement.layers

    def placement(generation: int, slots: tuple[int, ...]) -> Placement:
        return Placement(
            generation=generation, n_experts=8, rank_sizes=(8,), layers=layers, slots=(slots,) * len(layers)
        )

    # Expert 7 left out on purpose (a document could not do that), so that expert 7 is new to the next one.
    engine = TorchEngine.load(ckpt, dtype=torch.float32, placement=placement(0, (0, 1, 2, 3, 4, 5, 6, 0)))
    staged = engine.stage_placement(placement(1, (7, 6, 5, 4, 3, 2, 1, 0)))
    assert staged.fresh_bytes == len(layers) * 3 * 64 * 32 * 2  # expert 7 of each layer, nothing else
    engine.apply_placement(staged)
    reordered = engine.stage_placement(placement(2, (0, 1, 2, 3, 4, 5, 6, 7)))
    assert reordered.fresh_bytes == 0  # every expert is here: copied from its slot, none read
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[f"model.layers.{layers[0]}.mlp.experts.7.up_proj.weight"]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: shard file is missing"):
        TorchEngine.load(
            ckpt, dtype=torch.float32, placement=placement(0, (0, 1, 2, 3, 4, 5, 6, 0))
        ).stage_placement(placement(1, (7, 6, 5, 4, 3, 2, 1, 0)))


@pytest.mark.parametrize("form", ["kernel", "torch"])
def test_bf16_fast_paths_run_on_slots(
    checkpoints: dict[str, Path], form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 CPU paths (the MoE kernel, else the torch path's forms, both on the row-major stacks) after
    a live switch to slots with copies: same greedy tokens, the same path still taken."""
    from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel

    if form == "kernel" and moe_kernel.load() is None:
        pytest.skip("the MoE kernel does not run on this machine")
    if form == "torch":
        monkeypatch.setattr(moe_kernel, "load", lambda: None)  # as KUBEMOE_MOE_KERNEL=torch
    engine = TorchEngine.load(checkpoints["deepseek_v3"], dtype=torch.bfloat16)
    before_logits = engine.logits(PROMPT)
    before = engine.generate([PROMPT, PROMPT[:4]], max_new_tokens=6)
    slots = (7, 6, 5, 4, 3, 2, 1, 0, 7, 3)
    layers = engine.placement.layers
    placement = Placement(
        generation=1, n_experts=8, rank_sizes=(10,), layers=layers, slots=(slots,) * len(layers)
    )
    engine.apply_placement(engine.stage_placement(placement))
    for _, block in engine.moe_layers():
        experts = block.experts
        assert experts.kernel == (form == "kernel")
        assert experts.w_gate_up_E2FD.shape[0] == 10
        assert experts.w_gate_up_E2FD.dtype == torch.bfloat16
    forms: list[str] = []

    def recorded(name: str) -> Any:
        real = getattr(LocalExperts, name)

        def form_of(self: LocalExperts, *args: Any) -> Any:
            forms.append(name)
            return real(self, *args)

        return form_of

    for name in ("_grouped", "_looped", "_batched"):
        monkeypatch.setattr(LocalExperts, name, recorded(name))
    assert engine.generate([PROMPT, PROMPT[:4]], max_new_tokens=6) == before
    if form == "torch":  # grouped where torch's bf16 GEMM is fast; else grouped at decode's few rows an
        # expert and looped (through float32) from FLOAT32_MIN_ROWS rows on (a prefill may have some)
        fast = moe_kernel.fast_bf16_gemm()
        assert "_grouped" in forms
        assert set(forms) <= ({"_grouped"} if fast else {"_grouped", "_looped"})
    # bf16: the K choices are summed in another order once the slots move, so only bf16 rounding apart
    torch.testing.assert_close(engine.logits(PROMPT), before_logits, atol=0.05, rtol=0.05)
