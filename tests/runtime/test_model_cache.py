"""`kubemoe-runtime fill-cache` (#20): a model cache folder filled once from the Hub, with progress.

The Hub is the one stand-in: tests/runtime/fake_hub.py on 127.0.0.1 (HF_ENDPOINT), serving a tiny
checkpoint generated at test time (tools/checkpoints.py) with the Hub's own HTTP calls and error codes.
Everything else is real: the command runs as the process it is (`python -m kubemoe_runtime.cli`),
downloading with huggingface_hub into a temporary folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.tools import model_cache
from kubemoe_runtime.tools.model_cache import (
    MARKER,
    CacheFile,
    FillError,
    Source,
    UsageError,
    index_shards,
    parse_source,
    select_files,
)
from tests.runtime.fake_hub import FakeHub, Repo

TIMEOUT_S = 60
REPO = "tiny-org/tiny-moe"
# What a model repository holds beside what an engine needs: none of it is fetched.
EXTRAS = {
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"# tiny\n",
    "pytorch_model.bin": b"\0" * 1000,  # safetensors exist: the PyTorch copy is not fetched
    "model.gguf": b"GGUF",
    "consolidated.safetensors": b"\0" * 1000,  # another layout; the index does not name it
    "original/params.json": b"{}",  # a subfolder
}


def _wanted(checkpoint: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}


@pytest.fixture
def termination_log(tmp_path: Path) -> Path:
    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates it; the command only writes an existing file
    return path


def _env(hub_url: str, termination_log: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KUBEMOE_"))}
    return {
        **env,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "KUBEMOE_TERMINATION_LOG": str(termination_log),
        **extra,
    }


def _fill(*args: str | Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubemoe_runtime.cli", "fill-cache", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _run(*args: str | Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = _fill(*args, env=env)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def _error_line(code: int, out: str, err: str, expected_code: int = 1) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    assert out == ""
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert line == err.splitlines()[-1]
    return line


def _progress(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as response:
            doc: dict[str, Any] = json.loads(response.read())
            return doc
    except OSError:
        return None


@pytest.fixture
def hub(qwen: Path) -> Iterator[FakeHub]:
    # ~0.1 s a 32 KiB piece: each of the four ~140 KiB shards takes about half a second
    with FakeHub({REPO: Repo.of_folder(qwen, EXTRAS)}, delay_s=0.1).running() as running:
        yield running


def test_a_fill_is_byte_identical_reports_progress_and_then_is_a_no_op(
    hub: FakeHub, qwen: Path, tmp_path: Path, termination_log: Path
) -> None:
    cache = tmp_path / "cache"
    env = _env(hub.url, termination_log, tmp_path)
    port = free_port()
    proc = _fill("--source", f"hf://{REPO}", "--dir", cache, "--port", str(port), "--linger", "3", env=env)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        doc = _progress(port)
        if doc is not None:
            seen.append(doc)
            if doc["phase"] in ("done", "failed"):
                break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err

    wanted = _wanted(qwen)
    total = sum(len(data) for data in wanted.values())
    # progress: listing, then downloading with bytes that only grow, then done with everything
    phases = [doc["phase"] for doc in seen]
    assert "downloading" in phases
    assert phases[-1] == "done"
    assert phases.index("downloading") < phases.index("done")
    downloading = [doc for doc in seen if doc["phase"] == "downloading"]
    assert all(doc["bytesTotal"] == total and doc["filesTotal"] == len(wanted) for doc in downloading)
    counts = [doc["bytes"] for doc in seen if doc["phase"] != "listing"]
    assert counts == sorted(counts)
    assert any(0 < doc["bytes"] < total for doc in downloading), seen
    assert len({doc["bytes"] for doc in downloading}) >= 3  # it grew while we watched
    assert {k: seen[-1][k] for k in ("files", "filesTotal", "bytes", "bytesTotal")} == {
        "files": len(wanted),
        "filesTotal": len(wanted),
        "bytes": total,
        "bytesTotal": total,
    }

    # the folder: what an engine needs, byte for byte, and nothing else but the command's own state
    held = {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    assert held == set(wanted)
    for name, data in wanted.items():
        assert (cache / name).read_bytes() == data, name
    marker = json.loads((cache / MARKER).read_text())
    assert marker["source"] == f"hf://{REPO}"
    assert marker["revision"] == hub.repos[REPO].sha
    assert marker["bytes"] == total
    assert {(f["path"], f["size"]) for f in marker["files"]} == {(n, len(d)) for n, d in wanted.items()}

    # the log: a line per file; the summary on stdout and in the termination log
    assert sum(1 for line in err.splitlines() if line.endswith(")") and " files, " in line) >= len(wanted)
    summary = json.loads(out)
    assert summary["phase"] == "done"
    assert (summary["files"], summary["bytes"], summary["fetchedBytes"]) == (len(wanted), total, total)
    assert json.loads(termination_log.read_text()) == summary

    # a second run: complete, at once, without a request to the Hub
    hub.requests.clear()
    started = time.monotonic()
    code, out, err = _run("--source", f"hf://{REPO}", "--dir", cache, "--port", "0", env=env)
    assert code == 0, err
    assert "the cache is complete" in err
    assert json.loads(out)["alreadyComplete"] is True
    assert hub.requests == []
    assert time.monotonic() - started < 10


def test_a_size_that_differs_from_the_listing_fails_and_the_next_run_resumes(
    qwen: Path, tmp_path: Path, termination_log: Path
) -> None:
    repo = Repo.of_folder(qwen)
    largest = max(repo.files, key=lambda name: len(repo.files[name]))  # fetched last (smallest first)
    repo.listed_sizes[largest] = len(repo.files[largest]) + 1
    cache = tmp_path / "cache"
    with FakeHub({REPO: repo}).running() as hub:
        env = _env(hub.url, termination_log, tmp_path)
        code, out, err = _run("--source", f"hf://{REPO}", "--dir", cache, "--port", "0", env=env)
        line = _error_line(code, out, err)
        size = len(repo.files[largest])
        assert line == (
            f"kubemoe-runtime fill-cache: error: hf://{REPO}: {largest}: downloaded {size} bytes but the "
            f"Hub lists {size + 1}: the transfer was cut short or the repository changed meanwhile: run "
            "again (complete files are kept)"
        )
        assert termination_log.read_text() == line + "\n"
        assert not (cache / MARKER).exists()
        assert not (cache / largest).exists()

        repo.listed_sizes.clear()  # the Hub agrees with itself again
        hub.requests.clear()
        code, out, err = _run("--source", f"hf://{REPO}", "--dir", cache, "--port", "0", env=env)
        assert code == 0, err
        assert hub.downloads() == [largest]  # the rest was kept
        assert json.loads(out)["fetchedBytes"] == size
        for name, data in repo.files.items():
            assert (cache / name).read_bytes() == data


def test_an_unknown_repository_is_one_clear_line(hub: FakeHub, tmp_path: Path, termination_log: Path) -> None:
    env = _env(hub.url, termination_log, tmp_path)
    code, out, err = _run("--source", "hf://nobody/nothing", "--dir", tmp_path / "c", "--port", "0", env=env)
    line = _error_line(code, out, err)
    assert line == (
        f"kubemoe-runtime fill-cache: error: hf://nobody/nothing on {hub.url}: no such model repository "
        "(HTTP 401; HF_TOKEN is not set): check ORG/NAME; a private model needs HF_TOKEN with a token that "
        "can read it"
    )
    assert termination_log.read_text() == line + "\n"
    code, out, err = _run("--source", f"hf://{REPO}@v9", "--dir", tmp_path / "c", "--port", "0", env=env)
    assert "no such revision (HTTP 404)" in _error_line(code, out, err)


def test_a_gated_model_needs_hf_token(qwen: Path, tmp_path: Path, termination_log: Path) -> None:
    repo = Repo.of_folder(qwen, token="hf_secret")
    with FakeHub({REPO: repo}).running() as hub:
        args = ("--source", f"hf://{REPO}", "--dir", tmp_path / "c", "--port", "0")
        code, out, err = _run(*args, env=_env(hub.url, termination_log, tmp_path))
        assert "is gated (HTTP 401; HF_TOKEN is not set): accept its terms" in _error_line(code, out, err)
        code, out, err = _run(*args, env=_env(hub.url, termination_log, tmp_path, HF_TOKEN="hf_secret"))
        assert code == 0, err


def test_an_unreachable_hub_is_one_clear_line(tmp_path: Path, termination_log: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = _env(closed, termination_log, tmp_path)
    code, out, err = _run("--source", f"hf://{REPO}", "--dir", tmp_path / "c", "--port", "0", env=env)
    line = _error_line(code, out, err)
    assert line.startswith(f"kubemoe-runtime fill-cache: error: cannot reach the Hub at {closed} (")
    assert line.endswith(
        "check the pod's network (egress, proxy) or HF_ENDPOINT; run again (the fill resumes)"
    )


@pytest.mark.parametrize(
    "source",
    [
        "s3://bucket/model",
        "hf://just-a-name",
        "hf://../etc",
        "hf://org/../../etc",
        "hf://org/name/extra",
        "hf://org/na--me",
        "hf://org/name.git",
        "hf://-org/name",
        "hf://org/name@",
        "hf://org/name@../../x",
        "hf://org/name@/abs",
        "hf://org/name@a b",
        "hf://org/name@x;rm",
        "hf://org/" + "n" * 97,
    ],
)
def test_a_source_is_checked_as_untrusted_input(source: str) -> None:
    with pytest.raises(UsageError, match="give hf://ORG/NAME"):
        parse_source(source)


def test_good_sources() -> None:
    assert parse_source("hf://Qwen/Qwen3-30B-A3B") == Source("Qwen/Qwen3-30B-A3B")
    assert parse_source("hf://org_1/m.v2@refs/pr/3") == Source("org_1/m.v2", "refs/pr/3")
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert str(parse_source(f"hf://a/b@{sha}")) == f"hf://a/b@{sha}"


def test_a_bad_source_is_a_usage_error(tmp_path: Path, termination_log: Path) -> None:
    env = _env("http://127.0.0.1:9", termination_log, tmp_path)
    code, out, err = _run("--source", "hf://../etc", "--dir", tmp_path / "c", env=env)
    line = _error_line(code, out, err, expected_code=2)
    assert line == (
        "kubemoe-runtime fill-cache: error: --source 'hf://../etc' is not a Hugging Face model: give "
        "hf://ORG/NAME or hf://ORG/NAME@REVISION (a branch, tag or commit)"
    )
    assert termination_log.read_text() == line + "\n"


def test_only_plain_top_level_names_are_fetched() -> None:
    listing = {
        "config.json": 10,
        "../outside.json": 10,
        ".hidden.json": 10,
        "sub/config.json": 10,
        "a\\b.json": 10,
        "model.safetensors": 100,
        "weights.bin": 100,
        "tokenizer.model": 5,
        "merges.txt": 5,
        "notes.txt": 5,
        "chat_template.jinja": 5,
        "modeling_x.py": 5,
        "model.onnx": 5,
    }
    assert [f.path for f in select_files(listing)] == [
        "chat_template.jinja",
        "merges.txt",
        "modeling_x.py",
        "tokenizer.model",
        "config.json",
        "model.safetensors",
    ]


def test_pytorch_weights_only_without_safetensors() -> None:
    chosen = select_files({"config.json": 2, "pytorch_model.bin": 9, "model.gguf": 9})
    assert chosen == [CacheFile("config.json", 2), CacheFile("pytorch_model.bin", 9)]
    with pytest.raises(FillError, match="holds no weights"):
        select_files({"config.json": 2, "model.gguf": 9})


def test_the_index_names_the_shards(tmp_path: Path) -> None:
    listing = {"a.safetensors": 1, "b.safetensors": 1, "consolidated.safetensors": 2, "config.json": 1}
    chosen = select_files(listing, index_shards={"a.safetensors", "b.safetensors"})
    assert {f.path for f in chosen} == {"a.safetensors", "b.safetensors", "config.json"}
    with pytest.raises(FillError, match="does not hold"):
        select_files(listing, index_shards={"c.safetensors"})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(FillError, match="outside the folder"):
        index_shards(index)
    index.write_text("[1, 2]")
    with pytest.raises(FillError, match="not a safetensors index"):
        index_shards(index)


@pytest.mark.filterwarnings("ignore:Not enough free disk space")  # huggingface_hub's, seeing the same
def test_too_little_space_is_one_clear_line_before_a_shard_is_fetched(
    qwen: Path, tmp_path: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """In process: the volume reports 1 KiB free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with FakeHub({REPO: Repo.of_folder(qwen)}).running() as hub:
        for name, value in _env(hub.url, termination_log, tmp_path).items():
            monkeypatch.setenv(name, value)
        code = model_cache.main(["--source", f"hf://{REPO}", "--dir", str(tmp_path / "c"), "--port", "0"])
        assert code == 1
        assert hub.downloads() == ["model.safetensors.index.json"]  # it names the shards
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(
        f"kubemoe-runtime fill-cache: error: hf://{REPO}: {tmp_path / 'c'}: not enough space: "
    )
    assert line.endswith("1.0 KiB is free: give the volume at least 541.7 KiB (plus headroom)")


def test_a_full_disk_and_a_read_only_volume_name_the_fix(tmp_path: Path) -> None:
    source = Source("o/m")
    full = model_cache.explain(OSError(errno.ENOSPC, "No space left on device"), source, tmp_path)
    assert full.startswith(f"{tmp_path}: the volume is full (No space left on device): give it more space")
    denied = model_cache.explain(PermissionError(errno.EACCES, "Permission denied", "x"), source, tmp_path)
    assert denied.startswith(f"x: Permission denied: {tmp_path} must be writable by this process")


def test_progress_is_served_and_logged(capsys: Any) -> None:
    progress = model_cache.Progress()
    server = model_cache.ProgressServer(0, progress)
    server.start()
    try:
        port = server.server_address[1]
        progress.set(phase="downloading", files_total=2, bytes_total=300, current="a.safetensors")
        progress.finish_file(CacheFile("config.json", 100))
        progress.start_file(CacheFile("a.safetensors", 200))
        progress.arrived(50)
        progress.arrived(30)  # a retry counts again from a resume point: never backwards
        assert _progress(port) == {
            "phase": "downloading",
            "files": 1,
            "filesTotal": 2,
            "bytes": 150,
            "bytesTotal": 300,
            "message": "downloading a.safetensors",
        }
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=2)
        with model_cache.ticking(progress, 0.05):
            time.sleep(0.3)
    finally:
        server.shutdown()
    ticks = capsys.readouterr().err.splitlines()
    assert len(ticks) >= 2
    assert ticks[0] == (
        "kubemoe-runtime fill-cache: 1/2 files, 150 B of 300 B (50%), downloading a.safetensors"
    )


@pytest.mark.parametrize("case", ["too-large", "unsafe"])
def test_a_refused_index_is_not_left_in_the_folder(
    qwen: Path, tmp_path: Path, termination_log: Path, case: str
) -> None:
    real = (qwen / "model.safetensors.index.json").read_bytes()
    if case == "too-large":  # valid JSON of 70 MiB: refused from the listing's size, never downloaded
        index, refusal, fetched = real[:-2] + b" " * (70 << 20) + real[-2:], "is larger than 64.0 MiB", []
    else:  # small, but it names a shard outside the folder: downloaded, refused, removed
        index = json.dumps({"weight_map": {"x": "../x.safetensors"}}).encode()
        refusal, fetched = "names a shard outside the folder", ["model.safetensors.index.json"]
    repo = Repo.of_folder(qwen, {"model.safetensors.index.json": index})
    cache = tmp_path / "cache"
    with FakeHub({REPO: repo}).running() as hub:
        env = _env(hub.url, termination_log, tmp_path)
        code, out, err = _run("--source", f"hf://{REPO}", "--dir", cache, "--port", "0", env=env)
        line = _error_line(code, out, err)
        assert line.startswith(
            f"kubemoe-runtime fill-cache: error: hf://{REPO}: model.safetensors.index.json "
        )
        assert refusal in line
        assert hub.downloads() == fetched
    assert {p.name for p in cache.iterdir()} <= {".cache", ".kubemoe-fill.lock"}  # no index, no marker
    assert list(cache.rglob("*.incomplete")) == []
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < 4096  # the library's records


def test_two_fills_of_one_folder_take_turns_and_both_succeed(
    qwen: Path, tmp_path: Path, termination_log: Path
) -> None:
    """Two processes fill one folder at once (two ModelDeployments sharing a claim and a source, or a new
    Job's pod while the old one terminates): the second waits for the first, then finds it complete."""
    cache = tmp_path / "cache"
    downloads = cache / ".cache" / "huggingface" / "download"
    downloads.mkdir(parents=True)
    stale = downloads / "left-by-an-interrupted-run.incomplete"
    stale.write_bytes(b"\0" * 100)
    wanted = _wanted(qwen)
    # ~0.2 s a 32 KiB piece: each ~140 KiB shard takes about a second, so one is nearly always in flight
    with FakeHub({REPO: Repo.of_folder(qwen)}, delay_s=0.2).running() as hub:
        env = _env(hub.url, termination_log, tmp_path)
        args = ("--source", f"hf://{REPO}", "--dir", cache, "--port", "0")
        first = _fill(*args, env=env)
        deadline = time.monotonic() + TIMEOUT_S
        while not any(p != stale for p in downloads.glob("*.incomplete")):  # the first is mid-download
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not stale.exists()  # the first run dropped what an interrupted run left
        second = _fill(*args, env=env)
        out1, err1 = first.communicate(timeout=TIMEOUT_S)
        first_done = time.monotonic()
        out2, err2 = second.communicate(timeout=TIMEOUT_S)
        second_done = time.monotonic()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert f"waiting for another fill of {cache} to finish" in err2
    assert json.loads(out1)["fetchedBytes"] == sum(len(data) for data in wanted.values())
    assert json.loads(out2)["alreadyComplete"] is True
    assert second_done - first_done < 10  # it found the folder complete at once
    assert sorted(hub.downloads()) == sorted(wanted)  # each file once: the second fetched nothing
    for name, data in wanted.items():
        assert (cache / name).read_bytes() == data
    assert list(downloads.glob("*.incomplete")) == []
