"""A placement whose load blocks (serve/placement_switch.py's deadline), and a cancelled load stopping early.

The fault: opening a shard the new placement needs blocks in the kernel, as a read from a stalled network
volume does, until the test ends it on demand (the loader's read then fails): stall_hook.py. Before, the
generation stayed pending forever: every later POST answered 409 and only a pod restart cleared it.

- One rank, in process (GroupLeader, as test_expert_placement_switch.py): the generation is aborted with
  "load timed out" at its deadline, a later one is accepted, waits for the stuck loader (never two
  loaders reading at once on a rank), times out saying so; once the stuck read ends, the next applies.
- EP=2 through real servers: only rank 1 blocks; the abort names rank 1 and what it was doing, the group
  serves throughout, and a later generation applies once rank 1's read ends.
- A load cancelled while it runs stops before reading the rest of its experts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load import checkpoint_files
from kubemoe_runtime.engines.torch.model.engine import PlacementCancelled
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.placement_switch import Abort, PlacementConflict, Switch
from tests.runtime.serving import Server, http_get, http_post
from tests.runtime.stall_hook import open_or_stall, release, server_env, stall
from tests.runtime.test_expert_placement_switch import drive, last, placement, record_controls

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]
PLACEMENT_TIMEOUT_ENV = "KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S"


@pytest.fixture
def ckpt(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    return dst


def shard_of(ckpt: Path, layer: int, expert: int) -> Path:
    index: dict[str, str] = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / index[f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"]


def test_a_blocked_load_times_out_and_a_later_generation_applies(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_files, "open_regular_file", open_or_stall)
    timeout = 2.0
    start = placement(TorchEngine.load(ckpt, dtype=torch.float32), 2, (0, 1, 2, 3, 4, 5, 6, 0))
    engine = TorchEngine.load(ckpt, dtype=torch.float32, placement=start)  # expert 7 not held
    leader = GroupLeader(
        RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel(), placement_timeout_s=timeout
    )
    before = engine.logits(PROMPT)
    shard = shard_of(ckpt, start.layers[-1], 7)
    stall(shard)
    seen = record_controls(leader)

    assert (
        leader.switch.request(placement(engine, 3, (7, 6, 5, 4, 3, 2, 1, 0))) == "loading"
    )  # reads expert 7
    drive(leader, timeout=timeout + 10)  # before: pending forever
    assert last(seen) == Abort(3, timed_out=True)
    view = leader.switch.view()
    assert (view.applied, view.pending_generation) == (start, None)
    assert view.error is not None
    assert view.error.startswith(
        "generation 3 was not applied (generation 2 stays): load timed out after 2 s (rank 0: still reading "
        "the checkpoint after"
    ), view.error
    assert torch.equal(engine.logits(PROMPT), before)  # served on under the old placement

    # A later generation is accepted (before: 409 for good). It reads nothing new, but waits for the
    # stuck loader to end rather than read beside it, and times out saying so.
    swapped = placement(engine, 4, (1, 0, 2, 3, 4, 5, 6, 0))
    assert leader.switch.request(swapped) == "loading"
    with pytest.raises(
        PlacementConflict, match=r"generation 4 is still loading .*aborted if not ready 2 s after"
    ):
        leader.switch.request(placement(engine, 5, (0, 1, 2, 3, 4, 5, 6, 0)))
    drive(leader, timeout=timeout + 10)
    assert last(seen) == Abort(4, timed_out=True)
    error = leader.switch.view().error
    assert error is not None
    assert "load timed out after 2 s (rank 0: still waiting after" in error, error
    assert "for generation 3's loader to stop reading the checkpoint" in error, error
    assert engine.placement == start

    release([shard])  # the stuck read ends; its loader fails (it was dropped long ago) and lets go
    later = placement(engine, 6, (1, 0, 2, 3, 4, 5, 6, 0))
    assert leader.switch.request(later) == "loading"
    drive(leader, timeout=timeout + 10)
    assert last(seen) == Switch(6)
    assert leader.switch.view().error is None
    assert engine.placement == later
    torch.testing.assert_close(engine.logits(PROMPT), before, atol=1e-5, rtol=0)


def test_a_load_cancelled_while_it_runs_stops_before_reading_its_experts(ckpt: Path) -> None:
    """The first check passes; the next (the load is cancelled meanwhile) ends it. Before, the loader read
    every new expert and only then looked (between layers). Counted: this thread's bytes read."""
    start = placement(TorchEngine.load(ckpt, dtype=torch.float32), 2, (0, 1, 2, 3, 4, 5, 6, 0))
    engine = TorchEngine.load(ckpt, dtype=torch.float32, placement=start)  # expert 7 not held
    new = placement(engine, 3, (7, 6, 5, 4, 3, 2, 1, 0))  # reads expert 7 in each MoE layer
    keep = placement(engine, 4, (1, 0, 2, 3, 4, 5, 6, 0))  # the experts held now: nothing to read

    def bytes_read(target: Placement, checks_passed: int) -> tuple[int, int | None]:
        checks = [0]

        def cancelled() -> bool:
            checks[0] += 1
            return checks[0] > checks_passed

        io = Path("/proc/thread-self/io")
        before = int(io.read_text().split()[1])  # rchar
        staged = None
        with contextlib.suppress(PlacementCancelled):
            staged = engine.stage_placement(target, cancelled=cancelled)
        fresh = None if staged is None else staged.fresh_bytes
        return int(io.read_text().split()[1]) - before, fresh

    full, fresh = bytes_read(new, checks_passed=1_000_000)
    assert fresh
    cancelled, none = bytes_read(new, checks_passed=1)
    assert none is None  # PlacementCancelled
    assert cancelled + fresh <= full, (cancelled, fresh, full)  # none of the expert bytes was read
    assert bytes_read(keep, checks_passed=0)[1] is None  # cancelled with nothing to read: still cancelled


# --- real EP=2 servers --------------------------------------------------------------------------------

EP2 = ["--served-model-name", "tiny", "--max-model-len", "256", "--data-parallel-size", "2"]
EP2 += ["--enable-expert-parallel", "--redundant-experts", "2"]
MOE_LAYERS = [1, 2]  # the tiny Qwen3-MoE: layer 0 is dense


def doc(generation: int, slots: list[list[int]]) -> dict[str, Any]:
    layers = [{"layer": layer, "slots": s} for layer, s in zip(MOE_LAYERS, slots, strict=True)]
    return {"generation": generation, "ranks": 2, "slotsPerRank": 5, "layers": layers}


def pending(server: Server) -> dict[str, Any]:
    status, body = http_get(f"{server.url}/v1/experts/load")
    assert status == 200, body
    placement: dict[str, Any] = json.loads(body)["placement"]
    return placement


def settled(server: Server, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (placement := pending(server))["pending_generation"] is not None:
        assert time.monotonic() < deadline, f"still loading after {timeout} s\n{server.log()}"
        time.sleep(0.02)
    return placement


def completion(server: Server) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, answer = http_post(f"{server.url}/v1/completions", body)
    assert status == 200, answer
    text: str = answer["choices"][0]["text"]
    return text


def _shards(index: dict[str, str], layer: int, expert: int) -> set[str]:
    return {f for name, f in index.items() if name.startswith(f"model.layers.{layer}.mlp.experts.{expert}.")}


@pytest.mark.slow
def test_a_rank_whose_load_blocks_times_out_and_the_group_goes_on(ckpt: Path, tmp_path: Path) -> None:
    timeout = 4.0
    index: dict[str, str] = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    # Default placement with two redundant slots: rank 0 (0, 1, 2, 3, 0), rank 1 (4, 5, 6, 7, 4) a layer.
    # Generation 1 gives rank 0 a copy of expert 5 in layer 1 and rank 1 one of expert 1 in layer 2; the
    # shards only rank 1's copy needs stall, so rank 1 blocks and rank 0 is ready.
    default = [0, 1, 2, 3, 0, 4, 5, 6, 7, 4]
    blocked = [list(default), list(default)]
    blocked[0][4], blocked[1][9] = 5, 1
    stalled = [ckpt / name for name in sorted(_shards(index, 2, 1) - _shards(index, 1, 5))]
    assert stalled, "the tiny checkpoint's shards no longer separate these experts: pick others"
    env = {PLACEMENT_TIMEOUT_ENV: str(timeout)}
    env |= server_env(tmp_path / "stall-hook")
    server = Server(ckpt, args=EP2, log_dir=tmp_path, name="ep2-stalled", env=env)
    try:
        server.wait_ready()
        expected = completion(server)
        for path in stalled:
            stall(path)
        status, answer = http_post(f"{server.url}/v1/experts/placement", doc(1, blocked))
        assert status == 202, answer
        swapped = [[1, 0, 2, 3, 0, 4, 5, 6, 7, 4]] * 2  # rank 0's slots swapped, rank 1's as they are
        status, answer = http_post(f"{server.url}/v1/experts/placement", doc(2, swapped))
        assert status == 409, answer
        assert f"aborted if not ready {timeout:g} s after it began" in answer["error"]["message"]
        assert completion(server) == expected  # serving goes on while rank 1 is stuck

        placement = settled(server, timeout=timeout + 20)  # before: pending for good
        assert placement["generation"] == 0
        error = placement["error"]
        assert error.startswith(
            f"generation 1 was not applied (generation 0 stays): load timed out after {timeout:g} s (rank 1: "
            "still reading the checkpoint after"
        ), error
        assert "rank 0:" not in error  # rank 0 was ready: what it staged was dropped
        assert completion(server) == expected
        assert http_get(f"{server.url}/health")[0] == 200

        status, answer = http_post(f"{server.url}/v1/experts/placement", doc(2, swapped))
        assert (status, answer) == (202, {"generation": 2, "state": "loading"})  # before: 409 for good
        time.sleep(1.0)
        assert pending(server)["pending_generation"] == 2  # rank 1 waits for its stuck loader to end
        release(stalled)
        placement = settled(server, timeout=timeout + 20)
        assert (placement["generation"], placement["error"]) == (2, None), server.log()
        assert completion(server) == expected
        assert "failed to load (it was dropped already)" in server.log()
    finally:
        server.stop()
