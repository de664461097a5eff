"""Expert load (model/expert_load.py): counts against the gate's own choices, the window, the endpoint."""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine, init_expert_parallel
from kubemoe_runtime.engines.torch.model.expert_load import ExpertLoad, Window, valid_tokens
from kubemoe_runtime.engines.torch.model.moe import MoE
from kubemoe_runtime.engines.torch.model.parallel import (
    ExpertParallel,
    leave_process,
    shutdown_expert_parallel,
)
from kubemoe_runtime.engines.torch.model.placement import Placement, default_placement
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner, Row, Step
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

from .serving import Server, http_get, http_post

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]


def moe_layers(engine: TorchEngine) -> list[tuple[int, MoE]]:
    return [(i, b.ffn) for i, b in enumerate(engine.model.blocks()) if isinstance(b.ffn, MoE)]


def record_gates(engine: TorchEngine) -> list[list[torch.Tensor]]:
    """Every MoE layer's gate output ids, one [N, K] tensor per forward, as the gate returns them."""
    seen: list[list[torch.Tensor]] = [[] for _ in moe_layers(engine)]
    for index, (_, layer) in enumerate(moe_layers(engine)):
        layer.router.register_forward_hook(
            lambda _m, _i, out, index=index: seen[index].append(out[0].clone())
        )
    return seen


def reference(ids: list[torch.Tensor], n_experts: int) -> list[int]:
    """Tokens per expert from the gate's top-k ids."""
    flat = torch.cat([t.flatten() for t in ids]) if ids else torch.zeros(0, dtype=torch.int64)
    return torch.bincount(flat, minlength=n_experts).tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_counts_equal_the_gates_choices(arch: str, checkpoints: dict[str, Path]) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.float32)
    cfg = engine.cfg
    gates = record_gates(engine)
    # Two prompts of different lengths and a few decode steps: without a valid mask every token counts.
    engine.generate([PROMPT, PROMPT[:4]], max_new_tokens=4)
    window = engine.expert_load.window()
    assert list(window.layers) == [i for i, _ in moe_layers(engine)]
    assert list(window.layers) == [i for i, moe in enumerate(cfg.moe_layers) if moe]
    for i in range(len(window.layers)):
        expected = reference(gates[i], cfg.n_routed_experts)
        assert sum(expected) == 2 * (len(PROMPT) + 3) * cfg.top_k  # prefill padded to 9, then 3 steps
        assert window.tokens[i] == expected


def test_the_leader_counts_only_real_tokens(qwen: Path) -> None:
    """Through GroupLeader.run: the padding of a shorter row and an idle rank's dummy row do not count."""
    engine = TorchEngine.load(qwen, dtype=torch.float32)
    gates = record_gates(engine)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    greedy = SamplingParams()
    rows = [Row(0, 0, PROMPT, 0, sampling=greedy), Row(1, 1, PROMPT[:3], 0, sampling=greedy)]
    leader.run(Step(rows=[rows]))
    leader.run(Step(rows=[[]]))  # idle: a dummy row
    window = engine.expert_load.window()
    K, E = engine.cfg.top_k, engine.cfg.n_routed_experts
    for i in range(len(window.layers)):
        first, dummy = gates[i]
        assert first.shape[0] == 2 * len(PROMPT)
        assert dummy.shape[0] == 1
        real = torch.cat([first[: len(PROMPT)], first[len(PROMPT) : len(PROMPT) + 3]])
        assert window.tokens[i] == reference([real], E)
        assert sum(window.tokens[i]) == (len(PROMPT) + 3) * K


def test_valid_tokens_follow_the_dispatch_layout() -> None:
    cpu = torch.device("cpu")
    assert valid_tokens([[1, 1, 1]], device=cpu) is None  # decode: all real
    assert valid_tokens([[1], [1, 1]], device=cpu) is None
    mask = valid_tokens([[3, 1], []], device=cpu)
    assert mask is not None
    # rank 0: two rows padded to 3 (N=6); rank 1: its dummy row, padded to 6 like every rank's part
    assert mask.tolist() == [1, 1, 1, 1, 0, 0] + [0] * 6
    mask = valid_tokens([[1], [2, 2]], device=cpu)
    assert mask is not None
    assert mask.tolist() == [1, 0, 0, 0, 1, 1, 1, 1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_ages_old_traffic_out() -> None:
    clock = Clock()
    load = ExpertLoad(
        layers=[1],
        n_experts=4,
        placement=default_placement(n_experts=4, ranks=2, layers=[1]),
        window_s=60,
        interval_s=10,
        clock=clock,
    )
    load.count(0, torch.tensor([[0, 1], [0, -1]]))  # -1: a padding row of the dispatch
    assert load.window().tokens == [[2, 1, 0, 0]]
    for _ in range(5):  # 50 s later: still inside the window
        clock.now += 10
        load.tick()
    load.count(0, torch.tensor([[3, 3]]))
    assert load.window().tokens == [[2, 1, 0, 2]]
    for _ in range(2):  # 70 s after the first tokens, 20 s after the second
        clock.now += 10
        load.tick()
    window = load.window()
    assert window.tokens == [[0, 0, 0, 2]]
    assert 60 <= window.span_seconds <= 70
    for _ in range(7):
        clock.now += 10
        load.tick()
    assert load.window().tokens == [[0, 0, 0, 0]]


def test_a_valid_mask_of_another_shape_is_ignored() -> None:
    load = ExpertLoad(layers=[0], n_experts=2, placement=default_placement(n_experts=2, ranks=1, layers=[0]))
    load.valid_M = torch.tensor([1, 0])
    load.count(0, torch.tensor([[0], [1]]))
    load.count(0, torch.tensor([[1], [1], [0]]))  # not the step the mask was made for: all count
    assert load.window().tokens == [[2, 2]]


def test_imbalance_and_json() -> None:
    window = Window(
        window_seconds=300.0,
        span_seconds=12.5,
        layers=(1, 2),
        tokens=[[3, 1, 0, 0], [0, 0, 0, 0]],
        placement=default_placement(n_experts=4, ranks=2, layers=[1, 2]),
    )
    assert window.rank_loads(0) == [4, 0]
    assert window.imbalance(0) == 2.0
    assert window.imbalance(1) == 1.0  # no tokens: nothing to balance
    assert window.hottest_ratio(0) == 3.0
    assert window.as_json() == {
        "window_seconds": 300.0,
        "span_seconds": 12.5,
        "layers": [
            {"layer": 1, "tokens": [3, 1, 0, 0], "imbalance": 2.0, "slots": [0, 1, 2, 3]},
            {"layer": 2, "tokens": [0, 0, 0, 0], "imbalance": 1.0, "slots": [0, 1, 2, 3]},
        ],
        "placement": {
            "ranks": 2,
            "experts_per_rank": 2,
            "slots_per_rank": 2,
            "redundant": 0,
            "generation": 0,
            "pending_generation": None,
            "error": None,
        },
    }
    uneven = Window(300.0, 1.0, (0,), [[1, 1, 1]], default_placement(n_experts=3, ranks=2, layers=[0]))
    placement = uneven.as_json(pending_generation=4)["placement"]
    assert isinstance(placement, dict)
    assert placement["experts_per_rank"] == [2, 1]
    assert placement["slots_per_rank"] == [2, 1]
    assert placement["pending_generation"] == 4
    assert uneven.imbalance(0) == pytest.approx(2 / 1.5)


def test_imbalance_splits_a_replicated_experts_tokens_among_its_copies() -> None:
    """Expert 0 (hot) has a copy on each rank: its 6 tokens count 3 on each, so the ranks are even."""
    placement = Placement(
        generation=2, n_experts=4, rank_sizes=(3, 3), layers=(1,), slots=((0, 1, 2, 0, 3, 3),)
    )
    window = Window(300.0, 1.0, (1,), [[6, 1, 1, 2]], placement)
    assert window.rank_loads(0) == [3 + 1 + 1, 3 + 1 + 1]  # expert 3's two copies on rank 1 share its 2
    assert window.imbalance(0) == 1.0
    contiguous = Window(300.0, 1.0, (1,), [[6, 1, 1, 2]], default_placement(n_experts=4, ranks=2, layers=[1]))
    assert contiguous.imbalance(0) == pytest.approx(7 * 2 / 10)
    body = window.as_json()
    assert body["placement"] == {
        "ranks": 2,
        "experts_per_rank": 2,
        "slots_per_rank": 3,
        "redundant": 2,
        "generation": 2,
        "pending_generation": None,
        "error": None,
    }


def _ep_worker(rank: int, port: int, path: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    ep = init_expert_parallel(rank=rank, size=2, port=port)
    try:
        engine = TorchEngine.load(path, dtype=torch.float32, ep=ep)
        gates = record_gates(engine)
        engine.logits(PROMPT if rank == 0 else PROMPT[:2])  # ranks hold different tokens
        result = {
            "gates": [[t.tolist() for t in g] for g in gates],
            "tokens": engine.expert_load.window().tokens,
        }
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown_expert_parallel(ep)
    leave_process(0)


@pytest.mark.slow
def test_ep2_every_rank_counts_the_whole_groups_routing(qwen: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, port, qwen, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n_layers = len(ranks[0]["tokens"])
    assert n_layers > 0
    for i in range(n_layers):
        both = [torch.tensor(ids) for rank in ranks for ids in rank["gates"][i]]
        assert sum(len(t) for t in both) == len(PROMPT) + 2
        expected = reference(both, 8)
        assert ranks[0]["tokens"][i] == expected  # rank 0 alone knows every rank's choices
        assert ranks[1]["tokens"][i] == expected
        assert ranks[0]["tokens"][i] != reference([torch.tensor(ids) for ids in ranks[0]["gates"][i]], 8)


@pytest.fixture(scope="module")
def ep2_server(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--served-model-name", "tiny", "--max-model-len", "256"]
    args += ["--data-parallel-size", "2", "--enable-expert-parallel"]
    server = Server(qwen, args=args, log_dir=tmp_path_factory.mktemp("load"), name="ep2-load")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_the_endpoint_and_the_gauges_through_a_server(ep2_server: Server, qwen: Path) -> None:
    cfg = json.loads((qwen / "config.json").read_text())
    K, E = int(cfg["num_experts_per_tok"]), int(cfg["num_experts"])
    status, before = http_get(f"{ep2_server.url}/v1/experts/load")
    assert status == 200, before
    assert sum(map(sum, (layer["tokens"] for layer in json.loads(before)["layers"]))) == 0
    status, answer = http_post(
        f"{ep2_server.url}/v1/completions",
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    )
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 5
    status, body = http_get(f"{ep2_server.url}/v1/experts/load")
    assert status == 200, body
    load: dict[str, Any] = json.loads(body)
    assert load["window_seconds"] == 300.0
    assert load["placement"] == {
        "ranks": 2,
        "experts_per_rank": E // 2,
        "slots_per_rank": E // 2,
        "redundant": 0,
        "generation": 0,
        "pending_generation": None,
        "error": None,
    }
    moe = [i for i in range(int(cfg["num_hidden_layers"])) if i not in cfg.get("mlp_only_layers", [])]
    assert [layer["layer"] for layer in load["layers"]] == moe
    # The prompt, then 4 decode steps (the 5th token ends the request). Rank 1 ran a dummy row in each
    # of those 5 steps: counted, the sums would be 5 * K more.
    for layer in load["layers"]:
        assert len(layer["tokens"]) == E
        assert sum(layer["tokens"]) == (len(PROMPT) + 4) * K
        half = E // 2
        ranks = [sum(layer["tokens"][:half]), sum(layer["tokens"][half:])]
        assert layer["imbalance"] == pytest.approx(max(ranks) * 2 / sum(ranks), abs=1e-4)

    status, text = http_get(f"{ep2_server.url}/metrics")
    assert status == 200
    series = [line for line in text.splitlines() if line.startswith("kubemoe_expert_load_imbalance{")]
    assert sorted(int(line.split('layer="')[1].split('"')[0]) for line in series) == moe
    by_layer = {layer["layer"]: layer["imbalance"] for layer in load["layers"]}
    for line in series:
        layer = int(line.split('layer="')[1].split('"')[0])
        assert float(line.rsplit(" ", 1)[1]) == pytest.approx(by_layer[layer], abs=1e-3)
    (maximum,) = [line for line in text.splitlines() if line.startswith("kubemoe_expert_load_imbalance_max{")]
    assert float(maximum.rsplit(" ", 1)[1]) == pytest.approx(max(by_layer.values()), abs=1e-3)
    assert not any("expert=" in line for line in text.splitlines())  # never one series per expert
