"""`kubemoe-runtime` (#20): errors are one line on stderr and a non-zero exit, never a traceback
(KUBEMOE_DEBUG=1 adds it); `serve` refuses a --model it cannot run before any rank starts. Run as the
process it is (`python -m kubemoe_runtime.cli`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 120


def _runtime(*args: str | Path, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBEMOE_DEBUG"}
    if debug:
        env["KUBEMOE_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "kubemoe_runtime.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
    )


def _one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    return line


@pytest.fixture
def no_tokenizer(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A checkpoint without its tokenizer.json."""
    model = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoints["qwen3_moe"], model)
    (model / "tokenizer.json").unlink()
    return model


@pytest.fixture
def no_weights(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """config.json and the tokenizer, but no safetensors."""
    model = tmp_path / "no-weights"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints["qwen3_moe"] / name, model / name)
    return model


def test_generate_a_missing_model_dir(tmp_path: Path) -> None:
    done = _runtime("generate", "--model", tmp_path / "absent", "--prompt", "hi")
    assert _one_line(done, 2) == (
        f"kubemoe-runtime generate: error: --model: {tmp_path / 'absent' / 'config.json'}: not found"
    )
    assert done.stdout == ""


def test_generate_writes_its_usage_errors_to_stderr(checkpoints: dict[str, Path]) -> None:
    model = checkpoints["qwen3_moe"]
    done = _runtime("generate", "--model", model, "--prompt", "hi", "--data-parallel-size", "2")
    assert _one_line(done, 2) == (
        "kubemoe-runtime generate: error: plain data parallelism is not supported by `generate`; "
        "add --enable-expert-parallel"
    )
    assert done.stdout == ""
    done = _runtime("generate", "--model", model, "--prompt", "hi", "--max-tokens", "0")
    assert _one_line(done, 2) == "kubemoe-runtime generate: error: --max-tokens 0: give 1 or more"


def test_generate_without_a_tokenizer(no_tokenizer: Path) -> None:
    done = _runtime("generate", "--model", no_tokenizer, "--prompt", "hi")
    assert _one_line(done, 2) == f"kubemoe-runtime generate: error: --model {no_tokenizer}: no tokenizer.json"


def test_generate_without_weights_is_one_line_naming_what_is_missing(no_weights: Path) -> None:
    done = _runtime("generate", "--model", no_weights, "--prompt", "hi")
    line = _one_line(done, 1)
    assert line.startswith("kubemoe-runtime: error: ")
    assert "safetensors" in line


@pytest.mark.slow
def test_generate_expert_parallel_ranks_fail_one_line_each(no_weights: Path) -> None:
    done = _runtime(
        "generate",
        "--model",
        no_weights,
        "--prompt",
        "hi",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # each rank's error and the parent's, as one line each (other stderr, e.g. a library's warning on a
    # loaded machine, is not theirs to count)
    lines = [line for line in done.stderr.splitlines() if line.startswith("kubemoe-runtime generate: ")]
    assert len(lines) == 3, done.stderr
    assert {line.split(": ")[1] for line in lines[:-1]} == {"rank 0", "rank 1"}
    assert (
        lines[-1]
        == "kubemoe-runtime generate: error: expert-parallel ranks failed (rank: exit code) {0: 1, 1: 1}"
    )


def test_tiny_checkpoint_into_a_path_that_cannot_be(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _runtime("tiny-checkpoint", blocker / "out")
    assert _one_line(done, 1).startswith(f"kubemoe-runtime: error: {blocker / 'out'}: ")


def test_kubemoe_debug_adds_the_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _runtime("tiny-checkpoint", blocker / "out", debug=True)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"kubemoe-runtime: error: {blocker / 'out'}: ")


def test_a_bad_flag_value_is_argparse_s_usage_error(checkpoints: dict[str, Path]) -> None:
    done = _runtime(
        "generate", "--model", checkpoints["qwen3_moe"], "--prompt", "hi", "--data-parallel-size", "x"
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "kubemoe-runtime generate: error: argument --data-parallel-size: invalid int value: 'x'"
    )
    done = _runtime("serve", "--model", checkpoints["qwen3_moe"], "--port", "abc")
    assert done.returncode == 2
    assert (
        done.stderr.splitlines()[-1]
        == "kubemoe-runtime serve: error: argument --port: invalid int value: 'abc'"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("absent", "--model {model}: no such directory"),
        ("file", "--model {model}: not a directory"),
        ("empty", "--model: {model}/config.json: not found"),
        ("no_tokenizer", "--model {model}: no tokenizer.json (the pod that serves the API tokenizes)"),
    ],
)
def test_serve_refuses_a_model_it_cannot_run_before_starting(
    model: str, problem: str, tmp_path: Path, no_tokenizer: Path
) -> None:
    paths = {"absent": tmp_path / "absent", "file": tmp_path / "file", "empty": tmp_path / "empty"}
    paths["file"].write_text("")
    paths["empty"].mkdir()
    path = no_tokenizer if model == "no_tokenizer" else paths[model]
    done = _runtime("serve", "--model", path, "--host", "127.0.0.1", "--port", "0")
    assert _one_line(done, 2) == f"error: {problem.format(model=path)}"


def test_a_headless_rank_needs_no_tokenizer_to_pass_the_check(no_tokenizer: Path) -> None:
    from kubemoe_runtime.pod.settings import parse_args
    from kubemoe_runtime.serve import model_problem

    worker = [
        "--headless",
        "--data-parallel-size",
        "2",
        "--data-parallel-size-local",
        "1",
        "--data-parallel-rpc-port",
        "29500",
    ]
    settings, _ = parse_args(["--model", str(no_tokenizer), *worker, "--data-parallel-start-rank", "1"])
    assert model_problem(settings) is None
    settings, _ = parse_args(["--model", str(no_tokenizer)])
    assert (
        model_problem(settings)
        == f"--model {no_tokenizer}: no tokenizer.json (the pod that serves the API tokenizes)"
    )


def test_a_tokenizer_file_it_cannot_use_is_said_before_any_rank_starts(no_tokenizer: Path) -> None:
    # it was a traceback from the API's startup, after the ranks had started and loaded their weights
    from kubemoe_runtime.pod.settings import parse_args
    from kubemoe_runtime.serve import model_problem

    (no_tokenizer / "tokenizer.json").write_text("{not json")
    settings, _ = parse_args(["--model", str(no_tokenizer)])
    problem = model_problem(settings)
    assert problem is not None
    assert problem.startswith("--model: ")
    assert str(no_tokenizer / "tokenizer.json") in problem
