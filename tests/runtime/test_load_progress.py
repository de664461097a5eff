"""Load progress (#20): the loader counts the bytes a rank reads against those it planned to read, logs it
(at least every 5 s or every tenth), and the torch engine's `/ready` (the API pod's and a headless pod's)
answers 503 with `{"status": "loading", "bytes", "bytesTotal"}` until the group is ready, then 200."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import pytest
from starlette.testclient import TestClient

from kubemoe_runtime.engines.torch.load import tensor_reads as weights
from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import load_rank_weights
from kubemoe_runtime.engines.torch.model.parallel import shutdown_expert_parallel
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app, health_app
from kubemoe_runtime.engines.torch.serve.rank_job import RankJob, join_group
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics


class Recorder(LoadProgress):
    """A LoadProgress that remembers (bytes, bytesTotal) after every plan and read."""

    def __init__(self) -> None:
        super().__init__(label="rank 0")
        self.seen: list[tuple[int, int]] = []

    def plan(self, total: int) -> None:
        super().plan(total)
        self.seen.append(self.snapshot())

    def advance(self, n: int) -> None:
        super().advance(n)
        self.seen.append(self.snapshot())


def test_the_plan_comes_before_the_first_byte_and_the_count_ends_at_it(
    qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "READ_CHUNK", 4096)  # many reads from a tiny checkpoint
    progress = Recorder()
    _, report = load_rank_weights(qwen, cfg=ModelConfig.load(qwen), ep_rank=1, ep_size=2, progress=progress)
    first, *reads = progress.seen
    assert first == (0, report.bytes_read)  # planned: this rank's bytes, before any is read
    assert len(reads) > 10
    assert all(total == report.bytes_read for _, total in reads)
    done = [b for b, _ in reads]
    assert done == sorted(done)
    assert done[-1] == report.bytes_read


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _percents(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split("(")[-1].split(")")[0] for r in caplog.records if " of " in r.getMessage()]


def test_it_logs_every_tenth(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = LoadProgress(label="rank 3", clock=clock)
    with caplog.at_level(logging.WARNING, logger="kubemoe_runtime.load"):
        progress.plan(1000 << 20)
        for _ in range(100):
            progress.advance(10 << 20)  # 1% at a time, all within the same second
    assert caplog.records[0].getMessage() == "kubemoe-runtime: rank 3: loading weights: 1000.0 MiB to read"
    assert _percents(caplog) == [f"{p}%" for p in range(10, 101, 10)]
    assert caplog.records[-1].getMessage() == (
        "kubemoe-runtime: rank 3: loading weights: 1000.0 MiB of 1000.0 MiB (100%) in 0.0 s"
    )


def test_it_logs_every_5_s_while_bytes_trickle_in(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = LoadProgress(clock=clock)
    with caplog.at_level(logging.WARNING, logger="kubemoe_runtime.load"):
        progress.plan(10_000)
        for _ in range(40):  # 0.1% a second: 40 s, far from a tenth
            clock.now += 1
            progress.advance(10)
    logged = [r.getMessage() for r in caplog.records if " of " in r.getMessage()]
    assert len(logged) == 8  # one every 5 s
    assert logged[0].endswith("50 B of 9.8 KiB (0%) in 5.0 s")


# --- /ready -------------------------------------------------------------------------------------------


def _state(qwen: Path, tokenizer: TextTokenizer, progress: LoadProgress | None) -> ServerState:
    return ServerState(
        served_names=("tiny",),
        model_path=str(qwen),
        max_model_len=64,
        vocab_size=512,
        eos_token_ids=(0,),
        tokenizer=tokenizer,
        metrics=ServingMetrics(MetricLabels.from_env(role="worker", rank=0)),
        load_progress=progress,
    )


def test_the_api_pods_ready_reports_the_bytes_loaded(qwen: Path, tokenizer: TextTokenizer) -> None:
    progress = LoadProgress()
    state = _state(qwen, tokenizer, progress)
    with TestClient(build_app(state)) as http:
        before = http.get("/ready")
        assert (before.status_code, before.json()) == (
            503,
            {"status": "loading", "bytes": 0, "bytesTotal": 0},
        )
        progress.plan(4000)
        progress.advance(1500)
        loading = http.get("/ready")
        assert (loading.status_code, loading.json()) == (
            503,
            {"status": "loading", "bytes": 1500, "bytesTotal": 4000},
        )
        progress.advance(2500)
        state.scheduler = cast(Scheduler, object())  # what the engine thread sets once the group is ready
        ready = http.get("/ready")
        assert (ready.status_code, ready.text) == (200, "ready")
        state.failure = "RuntimeError: boom"
        failed = http.get("/ready")
        assert (failed.status_code, failed.json()) == (
            503,
            {"status": "failed", "message": "RuntimeError: boom"},
        )


def test_a_headless_pods_ready_reports_the_bytes_loaded() -> None:
    progress = LoadProgress()
    status = {"alive": True, "ready": False}
    app = health_app(is_alive=lambda: status["alive"], is_ready=lambda: status["ready"], progress=progress)
    with TestClient(app) as http:
        progress.plan(10)
        progress.advance(3)
        loading = http.get("/ready")
        assert (loading.status_code, loading.json()) == (
            503,
            {"status": "loading", "bytes": 3, "bytesTotal": 10},
        )
        status["ready"] = True
        assert (http.get("/ready").status_code, http.get("/ready").text) == (200, "ready")
        status["ready"], status["alive"] = False, False
        failed = http.get("/ready")
        assert failed.status_code == 503
        assert failed.json()["status"] == "failed"


def test_a_pods_rank_counts_its_load_in_the_pods_progress(qwen: Path) -> None:
    """join_group hands the pod's LoadProgress to the loader: /ready's numbers are the rank's own."""
    job = RankJob(
        model=qwen, dtype="float32", size=1, address="127.0.0.1", port=0, max_model_len=64, max_num_seqs=1
    )
    progress = LoadProgress()
    ep, runner = join_group(job, rank=0, progress=progress)
    try:
        read = runner.engine.load_report.bytes_read
        assert read > 0
        assert progress.snapshot() == (read, read)
    finally:
        shutdown_expert_parallel(ep)
