"""The pure parts of bench/llamacpp.py: llama-batched-bench's output read into the bench's rates (from
its real output, both formats), the build cache key, and the command line's shape."""

from __future__ import annotations

from pathlib import Path

import bigmoe
import llamacpp
import pytest

# llama-batched-bench (llama-cpp-python 0.3.36's llama.cpp, native build) on the 2-layer bench
# checkpoint, `--output-format jsonl`, 2 threads: its stdout and stderr together, as captured.
JSONL_OUTPUT = """\
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 32, "pl": 1, "n_kv": 160, "t_pp": 0.225159, "speed_pp": 568.487122, "t_tg": 0.346670, "speed_tg": 92.306801, "t": 0.571829, "speed": 279.803925}
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 32, "pl": 16, "n_kv": 2560, "t_pp": 1.923935, "speed_pp": 1064.484985, "t_tg": 2.089422, "speed_tg": 245.043839, "t": 4.013357, "speed": 637.869995}
0.00.006.723 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 4096
"""  # noqa: E501

# A second run's markdown table (the default --output-format md; a loaded machine, so other figures).
TABLE_OUTPUT = """\
llama_batched_bench: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     32 |    1 |    160 |    0.347 |   368.44 |    4.676 |     6.84 |    5.023 |    31.85 |
|   128 |     32 |   16 |   2560 |    2.912 |   703.38 |   13.952 |    36.70 |   16.864 |   151.81 |

0.00.009.454 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 4096
"""  # noqa: E501


def test_jsonl_records_give_prefill_and_decode_per_batch() -> None:
    rates = llamacpp.parse_rates(JSONL_OUTPUT)
    assert set(rates) == {"prefill@1", "decode@1", "prefill@16", "decode@16"}
    # speed_pp is prefill, speed_tg decode: not swapped, not the combined "speed"
    assert rates["prefill@1"] == pytest.approx(568.487122)
    assert rates["decode@1"] == pytest.approx(92.306801)
    assert rates["prefill@16"] == pytest.approx(1064.484985)
    assert rates["decode@16"] == pytest.approx(245.043839)


def test_the_markdown_table_reads_as_the_jsonl_does() -> None:
    rates = llamacpp.parse_rates(TABLE_OUTPUT)
    assert rates == {
        "prefill@1": pytest.approx(368.44),
        "decode@1": pytest.approx(6.84),
        "prefill@16": pytest.approx(703.38),
        "decode@16": pytest.approx(36.70),
    }


def test_logs_alone_give_no_rates() -> None:
    # A run that failed before its first row: nothing is read as a rate, so measure() reports it.
    log = "\n".join(line for line in JSONL_OUTPUT.splitlines() if not line.startswith("{"))
    assert llamacpp.parse_rates(log) == {}
    # The table's header and the rule under it are not rows.
    header = "\n".join(line for line in TABLE_OUTPUT.splitlines() if not line.startswith("|   128"))
    assert "S_PP t/s" in header
    assert llamacpp.parse_rates(header) == {}


def test_the_build_key_follows_profile_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    native = llamacpp.build_key("0.3.36", "native")
    avx2 = llamacpp.build_key("0.3.36", "avx2")
    assert native.startswith("build-native-")
    assert avx2.startswith("build-avx2-")
    assert native != avx2.replace("avx2", "native")  # the flags' digests differ too
    assert llamacpp.build_key("0.3.36", "native") == native  # stable across calls
    monkeypatch.setitem(llamacpp.PROFILE_FLAGS, "native", ("-DGGML_NATIVE=ON", "-DGGML_LLAMAFILE=OFF"))
    assert llamacpp.build_key("0.3.36", "native") != native  # a changed flag builds afresh


def test_the_avx2_build_has_no_avx512_and_the_native_one_is_native() -> None:
    avx2 = llamacpp.cmake_flags("avx2")
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"} <= set(avx2)
    assert not [f for f in avx2 if ("AVX512" in f or "AMX" in f) and not f.endswith("=OFF")]
    assert "-DGGML_NATIVE=ON" in llamacpp.cmake_flags("native")
    for profile in ("native", "avx2"):
        flags = llamacpp.cmake_flags(profile)
        assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_BLAS=OFF", "-DGGML_CUDA=OFF"} <= set(flags)


def test_the_bench_shape_reaches_the_command_line() -> None:
    argv = llamacpp.bench_argv(Path("/b/llama-batched-bench"), Path("/m.gguf"), 6)
    opts = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert argv[0] == "/b/llama-batched-bench"
    expected = {"-m": "/m.gguf", "-t": "6", "-tb": "6", "-npp": "128", "-ntg": str(bigmoe.DECODE)}
    assert {k: opts[k] for k in expected} == expected
    assert opts["-npl"] == "1,16"
    assert opts["--output-format"] == "jsonl"
    # The context holds 16 sequences of prompt + decode: a smaller one makes the bench skip batch 16.
    assert int(opts["-c"]) >= 16 * (128 + bigmoe.DECODE)


def test_the_gguf_is_cached_per_checkpoint_and_version() -> None:
    a = llamacpp.gguf_path(Path("/c/qwen3moe-L2"), "0.3.36")
    assert a.name == "qwen3moe-L2.bf16.gguf"
    assert a != llamacpp.gguf_path(Path("/c/qwen3moe-L8"), "0.3.36")
    assert a != llamacpp.gguf_path(Path("/c/qwen3moe-L2"), "0.3.37")


def test_a_step_that_cannot_be_done_is_one_line_and_no_rates(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_cmake(profile: str) -> Path:
        raise llamacpp.Unavailable("no cmake on the PATH")

    monkeypatch.setattr(llamacpp, "build", no_cmake)
    assert llamacpp.llamacpp_rates(Path("/c/m"), 2, "native") is None
    assert capsys.readouterr().out == "# llama.cpp: skipped: no cmake on the PATH\n"
    assert llamacpp.llamacpp_rates(Path("/c/m"), 2, "sse4") is None
    assert "no build for profile sse4" in capsys.readouterr().out
