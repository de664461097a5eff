"""The torch engine against transformers' implementation of the same checkpoint, at EP=1 and EP=2.

Everything runs in float32, where two correct implementations agree to rounding: random tiny models have
flat logits, so a lower precision could flip greedy choices between any two correct engines.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine, init_expert_parallel
from kubemoe_runtime.engines.torch.model.parallel import leave_process, shutdown_expert_parallel
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

ATOL = 1e-4
PROMPT = [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16, 5, 100, 200, 300, 17, 42, 7, 99]
SHORT_PROMPT = [12, 99, 480, 3, 77]
NEW_TOKENS = 12


@dataclass(frozen=True)
class Reference:
    logits: torch.Tensor  # [T, V] teacher-forced on PROMPT
    greedy: list[list[int]]  # continuations of PROMPT and SHORT_PROMPT


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    """Greedy decoding by full re-forward each step: the plainest reference there is."""
    seq = list(prompt)
    for _ in range(NEW_TOKENS):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


# Model types transformers knows by another name: Kimi K2 is DeepSeek-V3's architecture (its Hub checkpoint
# ships DeepSeek-V3's modeling code as remote code), so transformers' DeepSeek-V3 is its reference.
HF_MODEL_TYPES = {"kimi_k2": "deepseek_v3"}


def hf_model(path: Path) -> Any:
    """transformers' float32 model of a checkpoint, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((path / "config.json").read_text())
    kwargs: dict[str, Any] = {}
    if raw["model_type"] in HF_MODEL_TYPES:
        rest = {k: v for k, v in raw.items() if k != "model_type"}
        kwargs["config"] = AutoConfig.for_model(HF_MODEL_TYPES[raw["model_type"]], **rest)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model.eval()


@pytest.fixture(scope="session")
def references(checkpoints: dict[str, Path]) -> dict[str, Reference]:
    refs = {}
    for arch, path in checkpoints.items():
        model = hf_model(path)
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT])).logits[0]
            greedy = [_hf_greedy(model, PROMPT), _hf_greedy(model, SHORT_PROMPT)]
        refs[arch] = Reference(logits=logits, greedy=greedy)
    return refs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ep1_logits_and_greedy_match_transformers(
    checkpoints: dict[str, Path], references: dict[str, Reference], arch: str
) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.float32)
    logits = engine.logits(PROMPT)
    diff = (logits - references[arch].logits).abs().max().item()
    print(f"{arch} EP=1 max |logit diff| = {diff:.3g}")
    assert diff <= ATOL
    # Batched prefill of prompts of different lengths, then batched decode with the KV cache.
    assert (
        engine.generate_greedy([PROMPT, SHORT_PROMPT], max_new_tokens=NEW_TOKENS) == references[arch].greedy
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_logits_are_close(
    checkpoints: dict[str, Path], references: dict[str, Reference], arch: str
) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16)
    assert (engine.logits(PROMPT) - references[arch].logits).abs().max().item() < 0.25


def test_stop_tokens_end_a_row(checkpoints: dict[str, Path], references: dict[str, Reference]) -> None:
    engine = TorchEngine.load(checkpoints["mixtral"], dtype=torch.float32)
    expected = references["mixtral"].greedy[0]
    stop = expected[3]
    out = engine.generate_greedy([PROMPT], max_new_tokens=NEW_TOKENS, stop_token_ids=[stop])
    assert out == [expected[: expected.index(stop) + 1]]


def _ep_worker(rank: int, size: int, port: int, paths: dict[str, Path], out_dir: Path) -> None:
    torch.set_num_threads(1)
    ep = init_expert_parallel(rank=rank, size=size, port=port)
    try:
        results = {}
        for arch, path in paths.items():
            engine = TorchEngine.load(path, dtype=torch.float32, ep=ep)
            results[arch] = {
                "logits": engine.logits(PROMPT),
                "greedy": engine.generate_greedy([PROMPT, SHORT_PROMPT], max_new_tokens=NEW_TOKENS),
                # Ranks may hold different tokens: rank 1 runs a one-token batch while rank 0 runs PROMPT.
                "uneven": engine.logits(PROMPT if rank == 0 else PROMPT[:1]),
                "routed_expert_bytes": engine.load_report.routed_expert_bytes,
                "other_bytes": engine.load_report.other_bytes,
                "experts": list(engine.load_report.experts),
            }
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        shutdown_expert_parallel(ep)
    leave_process(0)


@pytest.mark.slow
def test_ep2_two_processes_match_transformers(
    checkpoints: dict[str, Path], references: dict[str, Reference], tmp_path: Path
) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, 2, port, checkpoints, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for arch in ARCHITECTURES:
        full = TorchEngine.load(checkpoints[arch], dtype=torch.float32).load_report
        assert [r[arch]["experts"] for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        for rank, result in enumerate(ranks):
            diff = (result[arch]["logits"] - references[arch].logits).abs().max().item()
            print(f"{arch} EP=2 rank {rank} max |logit diff| = {diff:.3g}")
            assert diff <= ATOL
            assert result[arch]["greedy"] == references[arch].greedy
            assert result[arch]["routed_expert_bytes"] * 2 == full.routed_expert_bytes
            assert result[arch]["other_bytes"] == full.other_bytes
        uneven0 = (ranks[0][arch]["uneven"] - references[arch].logits).abs().max().item()
        uneven1 = (ranks[1][arch]["uneven"] - references[arch].logits[:1]).abs().max().item()
        assert max(uneven0, uneven1) <= ATOL


def test_kv_export_import_continues_decoding(checkpoints: dict[str, Path]) -> None:
    """A prefill's KV, exported and imported into another cache slot, decodes the same next logits."""
    for arch in ("qwen3_moe", "deepseek_v3"):  # grouped-query K/V and MLA latents
        engine = TorchEngine.load(checkpoints[arch], dtype=torch.float32)
        model, n = engine.model, len(PROMPT)
        with torch.inference_mode():
            prefill_cache = model.new_cache(slots=1, max_len=n + 1, dtype=torch.float32)
            first = model(torch.tensor([PROMPT]), pos_BT=torch.arange(n)[None], cache=prefill_cache)
            next_token = first[:, -1].argmax(dim=-1, keepdim=True)
            kv = prefill_cache.export_slot(0, length=n)

            decode_cache = model.new_cache(slots=3, max_len=n + 1, dtype=torch.float32)
            assert decode_cache.import_slot(2, kv) == n
            step = {"pos_BT": torch.tensor([[n]])}
            imported = model(next_token, cache=decode_cache, slots_B=torch.tensor([2]), **step)
            local = model(next_token, cache=prefill_cache, **step)
        assert torch.equal(imported, local)


@pytest.mark.slow
def test_cli_generate_with_two_expert_parallel_ranks(checkpoints: dict[str, Path]) -> None:
    from tokenizers import Tokenizer

    ckpt = checkpoints["qwen3_moe"]
    prompt = "The experts route tokens"
    command = [sys.executable, "-m", "kubemoe_runtime.cli", "generate", "--model", str(ckpt)]
    command += ["--prompt", prompt, "--dtype", "float32", "--max-tokens", "6"]
    command += ["--data-parallel-size", "2", "--enable-expert-parallel"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    engine = TorchEngine.load(ckpt, dtype=torch.float32)
    [expected] = engine.generate_greedy(
        [tokenizer.encode(prompt).ids], max_new_tokens=6, stop_token_ids=engine.cfg.eos_token_ids
    )
    assert done.stdout == tokenizer.decode(expected) + "\n"
    assert "# ep=2 experts 0..3" in done.stderr


def test_seeded_sampling_is_reproducible_and_top_p_narrows_to_greedy(
    checkpoints: dict[str, Path], references: dict[str, Reference]
) -> None:
    engine = TorchEngine.load(checkpoints["qwen3_moe"], dtype=torch.float32)

    def run(*params: SamplingParams) -> list[list[int]]:
        prompts = [PROMPT] * len(params)
        return engine.generate(prompts, max_new_tokens=NEW_TOKENS, sampling=params)

    hot = SamplingParams(temperature=1.5, seed=7)
    first, again, other_seed = run(hot, hot, SamplingParams(temperature=1.5, seed=8))
    assert first == again  # same seed, same tokens, even side by side in one batch
    assert first != other_seed
    assert first != references["qwen3_moe"].greedy[0]
    [narrow] = run(SamplingParams(temperature=1.5, top_p=1e-6, seed=7))
    assert narrow == references["qwen3_moe"].greedy[0]  # top-p this small keeps only the top token
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
