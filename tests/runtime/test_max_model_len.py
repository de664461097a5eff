"""`serve`'s max_model_len and the KV caches it sizes (engines/torch/serve/kv_budget.py), and the
generation_config.json it reads.

Each rank zero-fills its KV cache up front, (--max-num-seqs + 1) x (max_model_len + 1) positions. Without
--max-model-len the pod serves the model's max_position_embeddings only where those caches take at most
KV_DEFAULT_SHARE of the memory available (Llama 4 Scout's config.json says 10,485,760 positions), and says
what it chose; a --max-model-len whose caches exceed the memory is refused before any rank starts, naming
the flags and the bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch.load.model_config import ConfigError, ModelConfig
from kubemoe_runtime.engines.torch.serve import kv_budget
from kubemoe_runtime.engines.torch.serve.generation_config import GenerationDefaults, generation_defaults
from kubemoe_runtime.engines.torch.serve.kv_budget import (
    KV_DEFAULT_SHARE,
    KV_FALLBACK_MAX_LEN,
    MaxModelLenError,
    choose_max_model_len,
    kv_bytes_per_position,
    kv_cache_bytes,
)
from kubemoe_runtime.pod.settings import ServeSettings, parse_args
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

from .test_llama4 import SCOUT_TEXT
from .test_model_config_validation import QWEN

GiB = 1 << 30
QWEN_POSITION = 3 * 2 * 2 * 32 * 2  # layers x (K, V) x KV heads x head_dim x bf16 bytes


def _settings(*flags: str) -> ServeSettings:
    settings, _ = parse_args(["--model", "m", *flags])
    return settings


def _qwen(positions: int = 512) -> ModelConfig:
    return ModelConfig.from_dict({**QWEN, "max_position_embeddings": positions})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_bytes_counted_are_the_bytes_a_rank_allocates(checkpoints: dict[str, Path], arch: str) -> None:
    """kv_cache_bytes counts what RankRunner allocates: (slots + 1) x (max_len + 1) of each layer's fields."""
    from kubemoe_runtime.engines.torch.model.decoder import Transformer
    from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel

    cfg = ModelConfig.load(checkpoints[arch])
    with torch.device("meta"):
        model = Transformer(cfg, ep=ExpertParallel())
    cache = model.new_cache(slots=3 + 1, max_len=5 + 1, dtype=torch.bfloat16)
    allocated = sum(t.nbytes for layer in cache.layers for t in layer.tensors.values())
    assert kv_cache_bytes(cfg, dtype="bfloat16", max_len=5, seqs=3, local_ranks=1) == allocated
    assert kv_bytes_per_position(cfg, "float32") == 2 * kv_bytes_per_position(cfg, "bfloat16")


def test_without_the_flag_the_models_positions_are_served_where_they_fit() -> None:
    max_len, note = choose_max_model_len(_settings(), _qwen(), dtype="bfloat16", available=10 * GiB)
    assert max_len == 512
    assert note == (
        "--max-model-len not given: serving the model's 512 positions (KV cache: 6.4 MiB for "
        "--max-num-seqs 16); give --max-model-len to choose"
    )


def test_without_the_flag_a_million_positions_are_cut_to_the_memory() -> None:
    """1,000,000 positions of the tiny model took 13 GB, zero-filled at start: now a share of the memory."""
    cfg, settings = _qwen(1_000_000), _settings()
    max_len, note = choose_max_model_len(settings, cfg, dtype="bfloat16", available=GiB)
    per_position = 17 * QWEN_POSITION  # (--max-num-seqs 16) + 1 slots
    assert max_len == (KV_DEFAULT_SHARE * GiB // per_position - 1) // 1024 * 1024 == 20480
    assert kv_cache_bytes(cfg, dtype="bfloat16", max_len=max_len, seqs=16, local_ranks=1) <= GiB // 4
    assert note is not None
    assert note == (
        "--max-model-len not given: serving 20480 of the model's 1000000 positions (KV cache: 255.0 MiB for "
        "--max-num-seqs 16): 1000000 positions would need 12.2 GiB of KV cache, more than 25% of the 1.0 GiB "
        "of memory available; give --max-model-len to choose"
    )
    # Llama 4 Scout's 10,485,760 positions on a 256 GiB machine.
    scout = ModelConfig.from_dict(SCOUT_TEXT)
    max_len, _ = choose_max_model_len(settings, scout, dtype="bfloat16", available=256 * GiB)
    assert max_len < scout.max_position_embeddings
    assert kv_cache_bytes(scout, dtype="bfloat16", max_len=max_len, seqs=16, local_ranks=1) <= 64 * GiB


def test_each_local_rank_has_its_own_cache() -> None:
    cfg = _qwen(1_000_000)
    one, _ = choose_max_model_len(_settings(), cfg, dtype="bfloat16", available=GiB)
    ranks = ["--data-parallel-size", "4", "--enable-expert-parallel"]
    four, _ = choose_max_model_len(_settings(*ranks), cfg, dtype="bfloat16", available=GiB)
    assert four < one / 3


def test_a_max_model_len_past_the_memory_is_refused_naming_the_flags_and_the_bytes() -> None:
    cfg = _qwen(1_000_000_000)
    with pytest.raises(MaxModelLenError) as caught:
        choose_max_model_len(_settings("--max-model-len", "1000000"), cfg, dtype="bfloat16", available=GiB)
    need = 17 * 1_000_001 * QWEN_POSITION
    assert str(caught.value) == (
        f"--max-model-len 1000000 with --max-num-seqs 16 needs 12.2 GiB ({need} bytes) of KV cache, more "
        "than the 1.0 GiB of memory available; at most --max-model-len 82240 fits: lower --max-model-len "
        "or --max-num-seqs"
    )
    fits = kv_cache_bytes(cfg, dtype="bfloat16", max_len=82240, seqs=16, local_ranks=1)
    assert fits <= GiB < kv_cache_bytes(cfg, dtype="bfloat16", max_len=82241, seqs=16, local_ranks=1)
    assert choose_max_model_len(
        _settings("--max-model-len", "82240"), cfg, dtype="bfloat16", available=GiB
    ) == (82240, None)
    with pytest.raises(MaxModelLenError, match=r"not even --max-model-len 2 fits: lower --max-model-len or"):
        choose_max_model_len(
            _settings("--max-model-len", "2", "--max-num-seqs", "10000000"),
            cfg,
            dtype="bfloat16",
            available=GiB,
        )
    with pytest.raises(
        MaxModelLenError,
        match=r"^--max-num-seqs 10000000: a KV cache of even 2 positions a sequence takes more than 25%",
    ):
        choose_max_model_len(_settings("--max-num-seqs", "10000000"), cfg, dtype="bfloat16", available=GiB)


def test_a_max_model_len_past_the_models_positions_is_refused() -> None:
    with pytest.raises(MaxModelLenError, match=r"^--max-model-len 600 exceeds the model's 512 positions$"):
        choose_max_model_len(_settings("--max-model-len", "600"), _qwen(), dtype="bfloat16", available=None)


def test_a_group_over_several_pods_must_give_the_flag_where_the_pods_would_cut() -> None:
    group = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--enable-expert-parallel"]
    group += ["--data-parallel-rpc-port", "29500"]
    assert choose_max_model_len(_settings(*group), _qwen(), dtype="bfloat16", available=GiB)[0] == 512
    with pytest.raises(
        MaxModelLenError, match=r"^give --max-model-len: the pods of a group over several pods"
    ):
        choose_max_model_len(_settings(*group), _qwen(1_000_000), dtype="bfloat16", available=GiB)


def test_where_the_memory_is_unknown_the_default_is_capped() -> None:
    max_len, note = choose_max_model_len(_settings(), _qwen(1_000_000), dtype="bfloat16", available=None)
    assert max_len == KV_FALLBACK_MAX_LEN
    assert note is not None
    assert note.endswith(
        "the memory available is unknown, and the default is at most 32768; give --max-model-len to choose"
    )


def test_the_available_memory_is_the_machines_or_the_cgroups(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   24000000 kB\n")
    assert kv_budget._meminfo_available(meminfo) == 24_000_000 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8000\n")
    (v2 / "memory.current").write_text("5000\n")
    (v2 / "memory.stat").write_text("anon 3000\ninactive_file 1000\n")
    assert kv_budget._cgroup_room(v2) == 8000 - (5000 - 1000)
    (v2 / "memory.max").write_text("max\n")
    assert kv_budget._cgroup_room(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("8000\n")
    (v1 / "memory.usage_in_bytes").write_text("9000\n")
    (v1 / "memory.stat").write_text("total_inactive_file 500\n")
    assert kv_budget._cgroup_room(tmp_path / "v1") == 0
    assert kv_budget._cgroup_room(tmp_path / "none") is None
    if Path("/proc/meminfo").exists():
        assert kv_budget.available_memory() is not None  # this machine's


# -- through the command line ----------------------------------------------------------------------


def _serve(model: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBEMOE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "kubemoe_runtime.cli", "serve", "--model", str(model), "--port", "0", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _with_config(checkpoints: dict[str, Path], tmp_path: Path, **changes: Any) -> Path:
    model = tmp_path / "model"
    shutil.copytree(checkpoints["qwen3_moe"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


def test_serve_refuses_a_billion_positions_before_any_rank_starts(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """1e9 positions was an allocator error from inside a rank, naming neither config.json nor the flag."""
    model = _with_config(checkpoints, tmp_path, max_position_embeddings=10**9)
    done = _serve(model, "--max-model-len", str(10**9))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("error: --max-model-len 1000000000 with --max-num-seqs 16 needs 11.")
    assert "TiB (13056000013056 bytes) of KV cache, more than the " in line
    assert line.endswith("fits: lower --max-model-len or --max-num-seqs")


# -- generation_config.json ------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    return model


def test_generation_defaults_are_read_and_checked(folder: Path) -> None:
    assert generation_defaults(folder) == GenerationDefaults()
    path = folder / "generation_config.json"
    path.write_text(
        json.dumps({"eos_token_id": [1, 2], "temperature": 0.6, "top_p": 0.95, "do_sample": True})
    )
    assert generation_defaults(folder) == GenerationDefaults((1, 2), temperature=0.6, top_p=0.95)
    path.write_text(json.dumps({"eos_token_id": 7, "temperature": None}))
    assert generation_defaults(folder) == GenerationDefaults((7,))
    path.write_text("[]")
    assert generation_defaults(folder) == GenerationDefaults()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"temperature": "hot"}, "temperature: 'hot' is not a number of 0 or more"),
        ({"temperature": -1}, "temperature: '-1' is not a number of 0 or more"),
        ({"top_p": 2}, "top_p: '2' is not a number from 0 to 1"),
        ({"eos_token_id": ["x"]}, "eos_token_id: \"['x']\" is not a token id"),
        ({"eos_token_id": True}, "eos_token_id: 'True' is not a token id"),
        (b"{bad", "cannot use it"),
        (b'{"\xff": 1}', "cannot use it"),
    ],
    ids=[
        "temperature-string",
        "temperature-negative",
        "top-p",
        "eos-strings",
        "eos-bool",
        "bad-json",
        "bad-utf8",
    ],
)
def test_a_malformed_generation_config_is_one_error_naming_it(
    folder: Path, content: Any, problem: str
) -> None:
    path = folder / "generation_config.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(ConfigError) as caught:
        generation_defaults(folder)
    assert str(caught.value).startswith(f"{path}: {problem}"), str(caught.value)


def test_a_generation_config_linked_out_of_the_folder_is_refused_without_reading_it(
    folder: Path, tmp_path: Path
) -> None:
    path = folder / "generation_config.json"
    path.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"a link to /dev/zero, outside the checkpoint folder"):
        generation_defaults(folder)
    path.unlink()
    (tmp_path / "outside.json").write_text("{}")
    path.symlink_to(tmp_path / "outside.json")
    with pytest.raises(ConfigError, match=r"outside\.json, outside the checkpoint folder"):
        generation_defaults(folder)


def test_serve_refuses_a_generation_config_linked_to_dev_zero(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model = _with_config(checkpoints, tmp_path)
    (model / "generation_config.json").unlink()
    (model / "generation_config.json").symlink_to("/dev/zero")
    done = _serve(model, "--max-model-len", "64")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {model / 'generation_config.json'}: cannot use it (")
    assert "a link to /dev/zero, outside the checkpoint folder" in line
