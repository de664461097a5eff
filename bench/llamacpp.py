"""llama.cpp as a further anchor for bench_engine.py: its CPU prefill and decode tokens/s, same checkpoint.

vLLM's CPU build and transformers are the bench's references; llama.cpp (ggml's own CPU kernels) is what
most people run MoE models on a CPU with, so the torch engine is measured against it too (issue 19).
Nothing of llama.cpp is vendored here: its source comes from the llama-cpp-python sdist on PyPI (its
vendor/llama.cpp), fetched with pip into the bench cache (CACHE/llama.cpp/<version>/) and built there
once per version and profile, just the `llama-batched-bench` target, CPU only (no BLAS, CUDA, Metal,
Vulkan), Release, static:

    native   GGML_NATIVE=ON: ggml's kernels for this CPU (-march=native)
    avx2     GGML_NATIVE=OFF with AVX, AVX2, FMA, F16C and BMI2 and no AVX-512 or AMX: an AVX2 CPU's build

The build directory's name carries a digest of its cmake flags (build_key), so a changed flag builds
afresh. The checkpoint is converted once to GGUF at bf16 (--outtype bf16; its norms and the router stay
float32, as the converter writes them) by the vendored convert_hf_to_gguf.py with the sdist's gguf-py and
this venv's transformers. The converter names a BPE tokenizer's pre-tokenizer by hashing the tokens of a
test string against a table of known models and refuses one it does not know, as it does the bench's
512-token BPE (kubemoe_runtime.tools.checkpoints.write_tokenizer); there is no option to skip that, so
the converter runs with that one lookup wrapped (CONVERT_SCRIPT): where the table has no entry and
tokenizer.json's pre-tokenizer is byte-level splitting with GPT-2's regex, as this one is, it is written
as "gpt-2", which is what it is. The vocabulary, merges and special tokens are the converter's own.

`llama-batched-bench -npp 128 -ntg 96 -npl 1,16 --output-format jsonl` then gives, per batch B, the time
of B 128-token prefills in one batch and of 96 (BENCH_DECODE) decode steps of B tokens after them: the bench's
prefill@B and decode@B (its prompts are random tokens too, each sequence with its own KV cache). It runs
each once, after a 16-token warm-up, where the bench keeps the best of three of the other engines.

`llamacpp_rates` returns None, with one line saying why, where any step fails (no cmake or compiler, pip
cannot fetch the sdist, the build, the conversion or the run fails): the bench goes on without it.
The build and the conversion run under nice -n 19 (and ionice -c3); the measurement does not.

Env: BENCH_LLAMACPP_VERSION (the llama-cpp-python version, default below), BENCH_LLAMACPP_JOBS (build
jobs, default 2). `python bench/llamacpp.py [native|avx2]` runs it alone (BENCH_LAYERS as the bench).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from bigmoe import CACHE, DECODE

VERSION: Final = os.environ.get("BENCH_LLAMACPP_VERSION", "0.3.36")
ROOT: Final = CACHE / "llama.cpp"
TARGET: Final = "llama-batched-bench"
PROMPT_LEN: Final = 128
BATCHES: Final = (1, 16)

Rates = dict[str, float]  # "prefill@B" / "decode@B" -> tokens/s

COMMON_FLAGS: Final = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_BLAS=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)
PROFILE_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx2": (
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON",
        "-DGGML_AVX512=OFF",
        "-DGGML_AVX512_VBMI=OFF",
        "-DGGML_AVX512_VNNI=OFF",
        "-DGGML_AVX512_BF16=OFF",
        "-DGGML_AVX_VNNI=OFF",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ),
}


class Unavailable(Exception):
    """A step cannot be done here; its message says why."""


def say(line: str) -> None:
    print(f"# llama.cpp: {line}", flush=True)


def cmake_flags(profile: str) -> tuple[str, ...]:
    return COMMON_FLAGS + PROFILE_FLAGS[profile]


def build_key(version: str, profile: str) -> str:
    """The build directory's name: the version, the profile and a digest of its cmake flags, so that a
    changed flag builds afresh rather than reusing a binary configured otherwise."""
    digest = hashlib.sha256("\n".join(cmake_flags(profile)).encode()).hexdigest()[:10]
    return f"build-{profile}-{digest}"


def niced(argv: Sequence[str]) -> list[str]:
    """`argv` at the lowest CPU (and, where ionice exists, idle I/O) priority: the build and the
    conversion run beside whatever else the machine does."""
    prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
    if shutil.which("ionice"):
        prefix += ["ionice", "-c3"]
    return [*prefix, *argv]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_logged(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> None:
    """`argv` with its output appended to `log`; Unavailable, with the log's last line, where it fails."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise Unavailable(
            f"exit {done.returncode}: {last_line(log.read_text(errors='replace'))} (log: {log})"
        )


def source(version: str = VERSION) -> Path:
    """llama.cpp's source tree from the llama-cpp-python `version` sdist (its vendor/llama.cpp), fetched
    with pip into the cache once."""
    src = ROOT / version / "src"
    if (src / "CMakeLists.txt").exists() and (src / "convert_hf_to_gguf.py").exists():
        return src
    downloads = ROOT / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        say(f"fetching the llama-cpp-python {version} sdist from PyPI (about 80 MB)")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(downloads)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0 or not sdist.exists():
            raise Unavailable(
                f"pip download llama-cpp-python=={version} failed: {done.stderr.strip()[-500:]}"
            )
    say(f"unpacking {sdist.name}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    partial = src.with_name("src.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name.removeprefix(prefix)
                members.append(member)
        tar.extractall(partial, members=members, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    partial.rename(src)
    return src


def build(profile: str, version: str = VERSION) -> Path:
    """The `llama-batched-bench` binary for `profile`, built once (cmake, Release, CPU only)."""
    build_dir = ROOT / version / build_key(version, profile)
    binary = build_dir / "bin" / TARGET
    if binary.exists():
        return binary
    if not shutil.which("cmake"):
        raise Unavailable("no cmake on the PATH")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise Unavailable("no C++ compiler on the PATH")
    src = source(version)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    jobs = os.environ.get("BENCH_LLAMACPP_JOBS", "2")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    say(f"building {TARGET} ({profile}) from llama-cpp-python {version}'s llama.cpp in {build_dir}")
    say(f"  nice -n 19, {jobs} jobs; this takes minutes (log: {log})")
    started = time.monotonic()
    try:
        run_logged(
            niced(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *cmake_flags(profile)]), log
        )
        say(f"  configured in {time.monotonic() - started:.0f} s; compiling")
        run_logged(niced(["cmake", "--build", str(build_dir), "--target", TARGET, "-j", jobs]), log)
    except Unavailable as e:
        raise Unavailable(f"the build failed, {e}") from None
    if not binary.exists():
        raise Unavailable(f"the build gave no {binary}")
    say(f"  built {TARGET} ({profile}) in {time.monotonic() - started:.0f} s")
    return binary


# Runs the vendored converter with one change: where its table of known BPE pre-tokenizers (hashes of
# a test string's tokens) has no entry for the checkpoint's tokenizer, a byte-level BPE whose
# pre-tokenizer splits with GPT-2's regex (tokenizer.json's ByteLevel, use_regex) is written as "gpt-2",
# which is what it is; any other tokenizer is still refused.
CONVERT_SCRIPT: Final = """
import json, runpy, sys
from pathlib import Path
src, argv = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(self.dir_model) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            print("KUBEMOE: pre-tokenizer unknown to the converter; byte-level with GPT-2's regex: gpt-2")
            return "gpt-2"
        raise
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [src + "/convert_hf_to_gguf.py", *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_path(model_dir: Path, version: str = VERSION) -> Path:
    return ROOT / version / "gguf" / f"{model_dir.name}.bf16.gguf"


def convert(model_dir: Path, version: str = VERSION) -> Path:
    """`model_dir` (a HF checkpoint) as a bf16 GGUF, converted once with the vendored converter."""
    out = gguf_path(model_dir, version)
    if out.exists():
        return out
    src = source(version)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    say(f"converting {model_dir.name} to GGUF at bf16 (log: {log})")
    started = time.monotonic()
    argv = [
        sys.executable,
        "-c",
        CONVERT_SCRIPT,
        str(src),
        str(model_dir),
        "--outtype",
        "bf16",
        "--outfile",
        str(partial),
    ]
    try:
        run_logged(niced(argv), log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except Unavailable as e:
        raise Unavailable(f"the conversion to GGUF failed, {e}") from None
    partial.rename(out)
    say(f"  converted in {time.monotonic() - started:.0f} s: {out} ({out.stat().st_size / 1e6:.0f} MB)")
    return out


def bench_argv(binary: Path, model: Path, n_threads: int) -> list[str]:
    """`llama-batched-bench` for the bench's shape: each batch B prefills B prompts of PROMPT_LEN random
    tokens in one batch (not shared: -pps off), then decodes DECODE steps of B tokens. The context holds
    the largest batch's sequences (each sequence its own KV stream, as vLLM's and the torch engine's)."""
    context = max(BATCHES) * (PROMPT_LEN + DECODE)
    return [
        str(binary), "-m", str(model), "-t", str(n_threads), "-tb", str(n_threads), "-c", str(context),
        "-npp", str(PROMPT_LEN), "-ntg", str(DECODE), "-npl", ",".join(map(str, BATCHES)),
        "--output-format", "jsonl",
    ]  # fmt: skip


def parse_rates(output: str) -> Rates:
    """prefill@B and decode@B (tokens/s) from llama-batched-bench's output: its JSONL records
    (--output-format jsonl: speed_pp, speed_tg per pl) or else its markdown table (S_PP t/s, S_TG t/s
    per B). Other lines (logs) are skipped; a batch with no row is left out."""
    rates: Rates = {}
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            record = json.loads(line)
            batch, prefill, decode = int(record["pl"]), float(record["speed_pp"]), float(record["speed_tg"])
        elif line.startswith("|") and line.count("|") == 11:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not cells[2].isdigit():
                continue  # the header and the rule under it
            batch, prefill, decode = int(cells[2]), float(cells[5]), float(cells[7])
        else:
            continue
        rates[f"prefill@{batch}"] = prefill
        rates[f"decode@{batch}"] = decode
    return rates


def measure(model: Path, n_threads: int, binary: Path) -> Rates:
    argv = bench_argv(binary, model, n_threads)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    rates = parse_rates(done.stdout)
    wanted = {f"{kind}@{b}" for b in BATCHES for kind in ("prefill", "decode")}
    if done.returncode != 0 or set(rates) != wanted:
        last = last_line(done.stdout + done.stderr)
        raise Unavailable(f"{TARGET} exit {done.returncode}, rates for {sorted(rates)}: {last}")
    return rates


def llamacpp_rates(model_dir: Path, n_threads: int, profile: str) -> Rates | None:
    """llama.cpp's prefill@B and decode@B on `model_dir` under the bench `profile` ("native" or "avx2"),
    or None, with a line saying why, where it cannot be built, converted or run here."""
    if profile not in PROFILE_FLAGS:
        say(f"skipped: no build for profile {profile}")
        return None
    try:
        binary = build(profile)
        model = convert(model_dir)
        say(f"{TARGET} ({profile}), {n_threads} threads, on {model.name}")
        return measure(model, n_threads, binary)
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        say(f"skipped: {e}")
        return None


if __name__ == "__main__":
    # A smoke run of this module alone: python bench/llamacpp.py [native|avx2] (BENCH_LAYERS as the bench).
    from bigmoe import checkpoint, layout_from_env, threads

    print(
        llamacpp_rates(
            checkpoint(layout_from_env()), threads(), sys.argv[1] if len(sys.argv) > 1 else "native"
        )
    )
