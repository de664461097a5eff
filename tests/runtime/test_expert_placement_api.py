"""POST /v1/experts/placement and GET /v1/experts/load (serve/app.py, placement_switch.py).

In-process (the app on a real scheduler and engine, no engine thread: a posted generation stays loading,
so 409 is certain): every bad document is a 400 naming the field, too large a body a 413, one generation
at a time. Through real EP=2 servers (two ranks, gloo): the file at start, a switch while a stream runs
(same tokens, no request fails), the load endpoint after it, a rank that cannot load its new experts
(a shard deleted from the checkpoint) leaving the old placement on every rank, a bad file stopping the pod.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from starlette.testclient import TestClient

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.serve.app import MAX_PLACEMENT_BYTES, ServerState, build_app
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.serving import Server, http_get, http_post

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]
MOE_LAYERS = [1, 2]  # the tiny Qwen3-MoE: layer 0 is dense (mlp_only_layers)


def doc(generation: int, slots: list[list[int]], *, ranks: int, per_rank: int) -> dict[str, Any]:
    return {
        "generation": generation,
        "ranks": ranks,
        "slotsPerRank": per_rank,
        "layers": [{"layer": layer, "slots": s} for layer, s in zip(MOE_LAYERS, slots, strict=True)],
    }


# --- in process -------------------------------------------------------------------------------------


@pytest.fixture
def app(qwen: Path, tokenizer: TextTokenizer) -> Iterator[TestClient]:
    """The API on a rank-0 scheduler whose engine holds 10 slots (8 experts + 2 redundant); no engine
    thread runs, so what is posted stays pending."""
    start = Placement(
        generation=1,
        n_experts=8,
        rank_sizes=(10,),
        layers=tuple(MOE_LAYERS),
        slots=((0, 1, 2, 3, 4, 5, 6, 7, 0, 1),) * 2,
    )
    engine = TorchEngine.load(qwen, dtype=torch.float32, placement=start)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    metrics = ServingMetrics(MetricLabels.from_env(role="worker", rank=0))
    limits = SchedulerLimits(max_model_len=64, max_num_seqs=2)
    state = ServerState(
        served_names=("tiny",),
        model_path=str(qwen),
        max_model_len=64,
        vocab_size=engine.cfg.vocab_size,
        eos_token_ids=tuple(engine.cfg.eos_token_ids),
        tokenizer=tokenizer,
        metrics=metrics,
        scheduler=Scheduler(
            leader, tokenizer=tokenizer, limits=limits, eos_token_ids=engine.cfg.eos_token_ids
        ),
    )
    with TestClient(build_app(state)) as client:
        yield client


SLOTS = [[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 1, 2, 3, 4, 5, 6, 7, 3, 4]]


def good(generation: int = 2) -> dict[str, Any]:
    return doc(generation, [list(s) for s in SLOTS], ranks=1, per_rank=10)


def with_layer(index: int, **entry: Any) -> dict[str, Any]:
    body = good()
    body["layers"][index] = {**body["layers"][index], **entry}
    return body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**good(), "ranks": 2}, "ranks"),
        ({**good(), "slotsPerRank": 8}, "slotsPerRank"),
        ({**good(), "generation": "2"}, "generation"),
        ({**good(), "generation": 2.5}, "generation"),
        ({**good(), "generation": -3}, "generation"),
        ({key: v for key, v in good().items() if key != "layers"}, "layers"),
        ({**good(), "layers": good()["layers"][:1]}, "layers"),  # layer 2 missing
        ({**good(), "layers": [*good()["layers"], good()["layers"][0]]}, "layers[2].layer"),  # repeated
        (with_layer(0, layer=0), "layers[0].layer"),  # the dense layer
        (with_layer(0, layer=7), "layers[0].layer"),  # no such layer
        (with_layer(1, slots=[0, 1, 2, 3, 4, 5, 6, 7, 3, 8]), "layers[1].slots[9]"),  # out of range
        (with_layer(1, slots=[0, 1, 2, 3, 4, 5, 6, 6, 3, 4]), "layers[1].slots"),  # expert 7 has no slot
        (with_layer(1, slots=[0, 1, 2, 3, 4, 5, 6, 7, 3]), "layers[1].slots"),  # 9 of 10
        (with_layer(1, slots=[0, 1, 2, 3, 4, 5, 6, 7, 3, True]), "layers[1].slots[9]"),  # not an integer
        (with_layer(1, slots=None), "layers[1].slots"),
        ([good()], "(document)"),
    ],
)
def test_a_bad_placement_is_a_400_naming_the_field(app: TestClient, body: Any, param: str) -> None:
    response = app.post("/v1/experts/placement", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")
    placement = app.get("/v1/experts/load").json()["placement"]
    assert (placement["generation"], placement["pending_generation"]) == (1, None)  # nothing started


@pytest.mark.parametrize(
    "raw", [b"{not json", b"\xff\xfe", b"[" * 100_000, b'{"generation": 1' + b"0" * 5000 + b"}", b""]
)
def test_a_body_that_is_not_json_is_a_400(app: TestClient, raw: bytes) -> None:
    response = app.post("/v1/experts/placement", content=raw)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "body"


def test_too_large_a_body_is_a_413(app: TestClient) -> None:
    body = good()
    body["padding"] = "x" * MAX_PLACEMENT_BYTES  # unknown keys are ignored, but not read without bound
    response = app.post("/v1/experts/placement", content=json.dumps(body).encode())
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "body"


def test_one_generation_at_a_time(app: TestClient) -> None:
    first = app.post("/v1/experts/placement", json={**good(2), "comment": "unknown keys are ignored"})
    assert (first.status_code, first.json()) == (202, {"generation": 2, "state": "loading"})
    again = app.post("/v1/experts/placement", json=good(2))
    assert (again.status_code, again.json()) == (202, {"generation": 2, "state": "loading"})
    other = app.post("/v1/experts/placement", json=good(3))
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "placement_loading"
    assert "generation 2 is still loading" in other.json()["error"]["message"]
    load = app.get("/v1/experts/load").json()
    assert load["placement"]["generation"] == 1
    assert load["placement"]["pending_generation"] == 2
    assert load["placement"]["slots_per_rank"] == 10
    assert load["placement"]["redundant"] == 2
    assert [layer["slots"] for layer in load["layers"]] == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * 2


def test_the_generation_applied_is_a_200(app: TestClient) -> None:
    applied = doc(1, [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * 2, ranks=1, per_rank=10)
    response = app.post("/v1/experts/placement", json=applied)
    assert (response.status_code, response.json()) == (200, {"generation": 1, "state": "applied"})
    reused = doc(1, [list(s) for s in SLOTS], ranks=1, per_rank=10)
    assert app.post("/v1/experts/placement", json=reused).status_code == 409  # its number, other slots


# --- real EP=2 servers --------------------------------------------------------------------------------

EP2 = ["--served-model-name", "tiny", "--max-model-len", "256", "--data-parallel-size", "2"]
EP2 += ["--enable-expert-parallel"]
START = [[4, 5, 6, 7, 0, 0, 1, 2, 3, 4], [7, 6, 5, 4, 3, 3, 2, 1, 0, 7]]  # generation 1, from the file
NEXT = [[0, 1, 2, 3, 5, 4, 5, 6, 7, 6], [1, 3, 5, 7, 0, 0, 2, 4, 6, 1]]  # generation 2, posted


@pytest.fixture(scope="module")
def ep2(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("placement")
    path = root / "placement.json"
    path.write_text(json.dumps(doc(1, START, ranks=2, per_rank=5)))
    args = [*EP2, "--redundant-experts", "2", "--expert-placement", str(path)]
    server = Server(qwen, args=args, log_dir=root, name="ep2-placement")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def get_load(server: Server) -> dict[str, Any]:
    status, body = http_get(f"{server.url}/v1/experts/load")
    assert status == 200, body
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def wait_settled(server: Server, *, timeout: float = 60.0) -> dict[str, Any]:
    """GET /v1/experts/load once no generation is loading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = get_load(server)
        if load["placement"]["pending_generation"] is None:
            return load
        time.sleep(0.01)
    raise AssertionError(f"a placement still loading after {timeout}s:\n{server.log()}")


def completion(server: Server, max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    status, answer = http_post(f"{server.url}/v1/completions", body)
    assert status == 200, answer
    return answer


@pytest.mark.slow
def test_a_switch_while_a_stream_runs(ep2: Server, engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    load = get_load(ep2)
    assert load["placement"] == {
        "ranks": 2,
        "experts_per_rank": 4,
        "slots_per_rank": 5,
        "redundant": 2,
        "generation": 1,
        "pending_generation": None,
        "error": None,
    }
    assert [layer["slots"] for layer in load["layers"]] == START
    n = 200
    [expected] = engine.generate([PROMPT], max_new_tokens=n)  # float32, EP=1, contiguous: the reference
    assert completion(ep2, n)["choices"][0]["text"] == tokenizer.decode(expected)

    client = openai.OpenAI(base_url=f"{ep2.url}/v1", api_key="unused", max_retries=0, timeout=120)
    pieces: list[str] = []
    finish: list[str | None] = []
    first, done = threading.Event(), threading.Event()

    def stream() -> None:
        try:
            chunks = client.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=n,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in chunks:
                pieces.append(chunk.choices[0].text)
                finish.append(chunk.choices[0].finish_reason)
                first.set()
        finally:
            done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(timeout=60)
    status, answer = http_post(f"{ep2.url}/v1/experts/placement", doc(2, NEXT, ranks=2, per_rank=5))
    assert (status, answer) == (202, {"generation": 2, "state": "loading"})
    deadline = time.monotonic() + 60
    while get_load(ep2)["placement"]["generation"] != 2:
        assert time.monotonic() < deadline, ep2.log()
        time.sleep(0.005)
    assert not done.is_set(), "the stream ended before the switch: it proves nothing (make it longer)"
    reader.join(timeout=120)
    assert "".join(pieces) == tokenizer.decode(expected)  # the same tokens as without a switch
    assert [f for f in finish if f] == ["length"]

    load = wait_settled(ep2)
    assert load["placement"]["generation"] == 2
    assert load["placement"]["error"] is None
    assert [layer["slots"] for layer in load["layers"]] == NEXT
    K = 2
    for layer in load["layers"]:  # the reference, then the stream: prompt + n - 1 decode steps each
        assert sum(layer["tokens"]) == 2 * (len(PROMPT) + n - 1) * K
    assert "applied at step" in ep2.log()
    status, answer = http_post(f"{ep2.url}/v1/experts/placement", doc(2, NEXT, ranks=2, per_rank=5))
    assert (status, answer) == (200, {"generation": 2, "state": "applied"})
    assert completion(ep2, 20)["choices"][0]["text"] == tokenizer.decode(expected[:20])


def _shards(index: dict[str, str], layer: int, expert: int) -> set[str]:
    return {f for name, f in index.items() if name.startswith(f"model.layers.{layer}.mlp.experts.{expert}.")}


@pytest.mark.slow
def test_a_rank_that_cannot_load_leaves_the_old_placement(
    qwen: Path, tmp_path: Path, engine: TorchEngine, tokenizer: TextTokenizer
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen, ckpt)
    index: dict[str, str] = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    # Two redundant slots, default placement: rank 0 (0, 1, 2, 3, 0), rank 1 (4, 5, 6, 7, 4) in each layer.
    # The next one gives rank 0 a copy of expert 5 in layer 1, and rank 1 a copy of expert 1 in layer 2:
    # then the files only rank 1's new copy needs go, so rank 1 fails to load and rank 0 succeeds.
    default = [0, 1, 2, 3, 0, 4, 5, 6, 7, 4]
    slots = [list(default), list(default)]
    slots[0][4], slots[1][9] = 5, 1
    gone = sorted(_shards(index, 2, 1) - _shards(index, 1, 5))
    assert gone, "the tiny checkpoint's shards no longer separate these experts: pick others"
    server = Server(ckpt, args=[*EP2, "--redundant-experts", "2"], log_dir=tmp_path, name="ep2-fault")
    try:
        server.wait_ready()
        [expected] = engine.generate([PROMPT], max_new_tokens=12)
        assert completion(server, 12)["choices"][0]["text"] == tokenizer.decode(expected)
        for name in gone:
            (ckpt / name).unlink()
        status, answer = http_post(f"{server.url}/v1/experts/placement", doc(1, slots, ranks=2, per_rank=5))
        assert status == 202, answer
        load = wait_settled(server)
        placement = load["placement"]
        assert placement["generation"] == 0
        assert [s["slots"] for s in load["layers"]] == [default] * len(MOE_LAYERS)
        error = placement["error"]
        assert error.startswith("generation 1 was not applied (generation 0 stays): rank 1: WeightLoadError:")
        assert gone[0] in error
        assert "rank 0:" not in error  # rank 0 had no error: what it staged was dropped, not switched to
        assert completion(server, 12)["choices"][0]["text"] == tokenizer.decode(expected)  # still serving
        assert http_get(f"{server.url}/health")[0] == 200
    finally:
        server.stop()


def test_a_bad_placement_file_stops_the_pod(qwen: Path, tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(doc(1, START, ranks=2, per_rank=4)))  # 4 slots a rank, the group has 5
    command = [sys.executable, "-m", "kubemoe_runtime.cli", "serve", "--model", str(qwen), *EP2]
    command += ["--redundant-experts", "2", "--expert-placement", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: slotsPerRank: {path}: is 4 but each rank of this group has 5 slots" in done.stderr
    bad = [*EP2, "--redundant-experts", "3"]
    done = subprocess.run([*command[:5], str(qwen), *bad], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--redundant-experts 3 is not a multiple of the 2" in done.stderr
