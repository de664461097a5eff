"""`kubemoe up` end to end: the tiny disaggregated example as local processes (router, prefill EP=1, decode
EP=2 over two "pods"), against the same model run colocated (`kubemoe up -d` on a colocated variant).

Through the router, with the official openai client, 16 concurrent requests, streaming and not: P/D returns
exactly the colocated engine's greedy tokens (float32), and the decode computes no prompt token. Then
`kubemoe status -o json`; and Ctrl-C on a foreground run and `kubemoe down` on a detached one (runs of
their own, under other names, so that the two shared runs live as long as the module), and not one
process of either left.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from kubemoe_runtime.pod.ports import free_port
from tests import openai_calls
from tests.operator.local.terminal import sigint_as_from_a_terminal

REPO = Path(__file__).resolve().parents[1]
KUBEMOE = str(Path(sys.executable).parent / "kubemoe")
PROMPTS = [f"The router sends request {i} to the experts of layer {i % 3}" for i in range(16)]
MAX_TOKENS = [5 + i % 7 for i in range(16)]
START_TIMEOUT_S = 300


@dataclass
class Run:
    name: str
    run_dir: Path
    endpoint: str
    process: subprocess.Popen[str] | None  # the foreground `kubemoe up`, if any
    cwd: Path

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [KUBEMOE, "status", "-o", "json", "--run-dir", str(self.run_dir)],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        status: dict[str, Any] = json.loads(out.stdout)
        return status

    def pgids(self) -> list[int]:
        state = json.loads((self.run_dir / "state.json").read_text())
        return [int(p["pid"]) for p in state["processes"]]


def live_members(pgids: list[int]) -> list[int]:
    """Non-zombie processes in any of these process groups."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) in pgids and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def variant(root: Path, name: str, *, colocated: bool) -> None:
    """root/NAME.yaml: the example under another name (a run dir of its own); colocated: one worker, EP=1."""
    manifest = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    manifest["metadata"]["name"] = name
    if colocated:
        spec = manifest["spec"]
        spec["serving"] = {"mode": "colocated"}
        worker = spec["roles"]["prefill"]
        spec["roles"] = {"worker": worker}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(manifest))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the example and variants of it; .run/ (models, runs) lands here."""
    root = tmp_path_factory.mktemp("local")
    shutil.copy(REPO / "examples" / "tiny-moe.yaml", root / "tiny-moe.yaml")
    variant(root, "tiny-colocated", colocated=True)
    variant(root, "tiny-ctrl-c", colocated=False)
    variant(root, "tiny-down", colocated=True)
    return root


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def up_foreground(workdir: Path, name: str) -> Run:
    """`kubemoe up NAME.yaml` in the foreground, returned once it has printed its endpoint (ready)."""
    port = free_port()
    log = workdir / f"{name}-up.log"
    process = subprocess.Popen(
        [KUBEMOE, "up", f"{name}.yaml", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env(),
        preexec_fn=sigint_as_from_a_terminal,  # noqa: PLW1509 (only this runs before exec)
    )
    assert process.stdout is not None
    # The endpoint, printed once everything is ready (one whole line, flushed).
    readable, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    line = process.stdout.readline().strip() if readable else ""
    if line != f"http://127.0.0.1:{port}/v1":
        stop_foreground(process)
        raise AssertionError(f"no endpoint from `kubemoe up` within {START_TIMEOUT_S}s:\n{log.read_text()}")
    return Run(name, workdir / ".run" / "up" / name, line, process, workdir)


def stop_foreground(process: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user would, if it still runs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def up_detached(workdir: Path, name: str, *, model: Path | None = None) -> Run:
    """`kubemoe up NAME.yaml -d`: returns once every process is ready; `kubemoe down NAME` ends it."""
    port = free_port()
    model_args = ["--model", str(model)] if model else []
    up = subprocess.run(
        [KUBEMOE, "up", f"{name}.yaml", "-d", "--port", str(port), *model_args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env(),
        timeout=START_TIMEOUT_S,
    )
    assert up.returncode == 0, up.stderr
    return Run(name, workdir / ".run" / "up" / name, up.stdout.strip(), None, workdir)


def down(run: Run) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBEMOE, "down", run.name], cwd=run.cwd, capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture(scope="module")
def disaggregated(workdir: Path) -> Iterator[Run]:
    """`kubemoe up tiny-moe.yaml` in the foreground, for the whole module; Ctrl-C ends it."""
    run = up_foreground(workdir, "tiny-moe")
    assert run.process is not None
    try:
        yield run
    finally:
        stop_foreground(run.process)


@pytest.fixture(scope="module")
def colocated(workdir: Path, disaggregated: Run) -> Iterator[Run]:
    """The same checkpoint, colocated (one worker, EP=1), detached, for the whole module."""
    model = workdir / ".run" / "models" / "tiny-qwen3-moe"  # generated by the disaggregated run
    run = up_detached(workdir, "tiny-colocated", model=model)
    try:
        yield run
    finally:
        down(run)


def client(endpoint: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint, api_key="local", max_retries=0, timeout=120)


def complete(c: openai.OpenAI, model: str, i: int) -> tuple[str, int]:
    return openai_calls.complete(c, model=model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i])[:2]


def chat_stream(c: openai.OpenAI, model: str, i: int) -> tuple[str, int]:
    return openai_calls.chat_stream(c, model=model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i])[:2]


def all_at_once(fn: Callable[[openai.OpenAI, str, int], tuple[str, int]], run: Run) -> list[tuple[str, int]]:
    c = client(run.endpoint)
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(lambda i: fn(c, "tiny-qwen3-moe", i), range(len(PROMPTS))))


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


def test_status_shows_roles_ranks_and_endpoint(disaggregated: Run) -> None:
    status = disaggregated.status()
    assert status["ready"] is True
    assert status["endpoint"] == disaggregated.endpoint
    assert status["layout"] == "P1x(EP1) D1x(EP2)"
    assert [(p["role"], p["ranks"], p["state"]) for p in status["processes"]] == [
        ("prefill", [0], "ready"),
        ("decode", [0], "ready"),
        ("decode", [1], "ready"),
        ("router", [], "ready"),
    ]
    logs = sorted(p.name for p in (disaggregated.run_dir / "logs").iterdir())
    assert logs == ["decode-g0-p0.log", "decode-g0-p1.log", "prefill-g0-p0.log", "router.log"]


def test_disaggregated_equals_colocated(disaggregated: Run, colocated: Run) -> None:
    start = time.monotonic()
    pd_completions = all_at_once(complete, disaggregated)
    pd_chats = all_at_once(chat_stream, disaggregated)
    pd_s = time.monotonic() - start
    start = time.monotonic()
    co_completions = all_at_once(complete, colocated)
    co_chats = all_at_once(chat_stream, colocated)
    co_s = time.monotonic() - start
    print(f"\n32 requests (16 concurrent, twice): P/D {pd_s:.2f}s, colocated {co_s:.2f}s")
    assert pd_completions == co_completions
    assert pd_chats == co_chats
    assert all(n > 0 for _, n in pd_completions)
    decode = next(p for p in disaggregated.status()["processes"] if p["name"] == "decode-g0-p0")
    assert metric(decode["url"], "kubemoe_prompt_tokens_total") == 0  # the decode never ran a prompt
    assert metric(decode["url"], "kubemoe_kv_pulled_tokens_total") > 0


def test_down_stops_a_detached_run(workdir: Path) -> None:
    run = up_detached(workdir, "tiny-down")
    try:
        pgids = run.pgids()
        assert live_members(pgids)
        stopped = down(run)
        assert stopped.returncode == 0, stopped.stderr
        assert live_members(pgids) == []
        # the run is gone with its processes: no state left for a later `down` to act on (a pid in it
        # could belong to another process by then)
        assert not (run.run_dir / "state.json").exists()
        gone = subprocess.run(
            [KUBEMOE, "status", "-o", "json", "--run-dir", str(run.run_dir)],
            cwd=run.cwd,
            capture_output=True,
            text=True,
        )
        assert gone.returncode == 1
        assert "no local run" in gone.stderr
    finally:
        down(run)


def test_ctrl_c_stops_everything(workdir: Path) -> None:
    run = up_foreground(workdir, "tiny-ctrl-c")
    assert run.process is not None
    try:
        pgids = run.pgids()
        assert len(live_members(pgids)) >= 4
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(timeout=60) == 0
        assert live_members(pgids) == []
    finally:
        stop_foreground(run.process)
