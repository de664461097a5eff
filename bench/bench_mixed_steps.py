"""A serving step where a prompt joins running decodes: the step's forwards as planned now, against the old
single forward that padded every decode row to the prompt's length, in one run.

The engine (float32, one thread, as the tests and `kubemoe up` run it) on the tests' tiny Qwen3-MoE; one
rank (EP=1), driven through GroupLeader.run, the scheduler's own call. DECODES sequences are prefilled,
then each measured step runs their one-token decode rows with one new prompt of PROMPT_TOKENS tokens:

    planned   group.py's plan_forwards: decode rows and the prompt in forwards of their own where the
              padding saved costs more than one more forward (FORWARD_COST_TOKENS)
    single    the old batching: one forward over every row, padded to the longest: (DECODES + 1) x T
              token rows (plan_forwards replaced by one that returns a single forward)

and, as the references: the decode rows alone (a plain decode step: one forward either way) and the
prompt alone. Steps run interleaved, planned and single in turn, repeat by repeat; the best of REPEATS is
kept (the machine is shared: best times are the stable ones). Each row's sampled token is compared
between planned and single (greedy: they must be identical). Printed: the CPU and its flags; per prompt
length: token rows each way, ms each way, single / planned (the speed-up), and planned against the sum of
its two references (what running the two forwards costs over running each alone: about 1).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_mixed_steps.py

Env: BENCH_MIXED_DECODES=16, BENCH_MIXED_PROMPTS=8,16,64,128,500 (prompt tokens), BENCH_MIXED_REPEATS=7.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve import group
from kubemoe_runtime.engines.torch.serve.group import FORWARD_COST_TOKENS, GroupLeader, RankRunner, Row, Step
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint

DECODES: Final = int(os.environ.get("BENCH_MIXED_DECODES", "16"))
PROMPTS: Final = tuple(int(n) for n in os.environ.get("BENCH_MIXED_PROMPTS", "8,16,64,128,500").split(","))
REPEATS: Final = int(os.environ.get("BENCH_MIXED_REPEATS", "7"))
CONTEXT: Final = 8  # each decoding sequence's prompt
MAX_LEN: Final = 512  # the tiny model's positions

Plan = Callable[[Sequence[Sequence[Row]]], list[list[list[int]]]]
PLANNED: Final[Plan] = group.plan_forwards


def single(rows: Sequence[Sequence[Row]]) -> list[list[list[int]]]:
    """The old batching: every row of a rank in one forward."""
    return [[list(range(len(rank_rows))) for rank_rows in rows]]


def cpu_line() -> str:
    flags = moe_kernel.cpu_flags()
    shown = " ".join(f for f in moe_kernel.SHOWN_FLAGS if f in flags) or "none of interest"
    aten = torch.backends.cpu.get_cpu_capability()
    return (
        f"# CPU {platform.machine()}, flags: {shown}; torch {torch.__version__}, ATen {aten}, "
        f"{torch.get_num_threads()} thread(s); MoE routed experts: {moe_kernel.path()}"
    )


class Bench:
    def __init__(self, engine: TorchEngine) -> None:
        self.leader = GroupLeader(RankRunner(engine, slots=DECODES + 1, max_len=MAX_LEN), ep=ExpertParallel())
        self.next_id = 0
        # The decoding sequences: slots 0 .. DECODES-1, prefilled; each measured step decodes position CONTEXT
        # again (the same work every repeat).
        self.decodes = [
            self.row(slot, [(7 * slot + j) % 500 + 1 for j in range(CONTEXT)], 0) for slot in range(DECODES)
        ]
        first = self.run([self.decodes], plan=PLANNED)
        self.decodes = [
            Row(r.request_id, r.slot, [t], CONTEXT) for r, t in zip(self.decodes, first, strict=True)
        ]

    def row(self, slot: int, tokens: list[int], start: int) -> Row:
        self.next_id += 1
        return Row(self.next_id, slot, tokens, start, sampling=SamplingParams())

    def run(self, rows: list[list[Row]], *, plan: Plan) -> list[int]:
        group.plan_forwards = plan  # type: ignore[assignment]  # RankRunner.run looks it up at each step
        try:
            [tokens] = self.leader.run(Step(rows=rows))
        finally:
            group.plan_forwards = PLANNED  # type: ignore[assignment]
        return tokens

    def timed(self, rows: list[Row], *, plan: Plan) -> tuple[float, list[int]]:
        started = time.perf_counter()
        tokens = self.run([rows], plan=plan)
        return time.perf_counter() - started, tokens

    def prompt(self, tokens: int) -> Row:
        return self.row(DECODES, [(11 * j + 5) % 500 + 1 for j in range(tokens)], 0)  # a fresh sampler each


def main() -> None:
    torch.set_num_threads(1)
    print(cpu_line())
    with tempfile.TemporaryDirectory(prefix="kubemoe-bench-mixed-") as scratch:
        model = write_tiny_checkpoint(Path(scratch) / "qwen3_moe", arch="qwen3_moe", seed=0)
        measure(Bench(TorchEngine.load(model, dtype=torch.float32)))


def measure(bench: Bench) -> None:
    print(
        f"# tiny Qwen3-MoE (float32, EP=1): {DECODES} decoding sequences + one prompt joining; "
        f"FORWARD_COST_TOKENS={FORWARD_COST_TOKENS}; best of {REPEATS}"
    )
    decode_best = {"planned": float("inf"), "single": float("inf")}
    for repeat in range(REPEATS + 1):  # plain decode steps (the first round warms up)
        for name, plan in (("planned", PLANNED), ("single", single)):
            elapsed, _ = bench.timed(bench.decodes, plan=plan)
            if repeat:
                decode_best[name] = min(decode_best[name], elapsed)
    planned_ms, single_ms = decode_best["planned"] * 1e3, decode_best["single"] * 1e3
    print(
        f"# plain decode step ({DECODES} rows, one forward either way): planned {planned_ms:.1f} ms, "
        f"single {single_ms:.1f} ms (single / planned {single_ms / planned_ms:.2f})"
    )
    header = ("prompt", "rows single", "rows planned", "forwards", "single ms", "planned ms", "speed-up")
    print(
        f"{header[0]:>6} {header[1]:>11} {header[2]:>12} {header[3]:>8} {header[4]:>9} {header[5]:>10} "
        f"{header[6]:>8} {'prompt alone ms':>15} {'planned / (decode + alone)':>26}"
    )
    identical = True
    for n in PROMPTS:
        best = {"planned": float("inf"), "single": float("inf"), "alone": float("inf")}
        forwards = PLANNED([[*bench.decodes, bench.prompt(n)]])
        for repeat in range(REPEATS + 1):
            results = {}
            for name, how in (("planned", PLANNED), ("single", single)):
                elapsed, results[name] = bench.timed([*bench.decodes, bench.prompt(n)], plan=how)
                if repeat:
                    best[name] = min(best[name], elapsed)
            identical &= results["planned"] == results["single"]
            elapsed, _ = bench.timed([bench.prompt(n)], plan=PLANNED)
            if repeat:
                best["alone"] = min(best["alone"], elapsed)
        rows_single = (DECODES + 1) * n
        rows_planned = sum(len(f[0]) * max(1 if i < DECODES else n for i in f[0]) for f in forwards)
        speed_up = best["single"] / best["planned"]
        overhead = best["planned"] / (decode_best["planned"] + best["alone"])
        print(
            f"{n:>6} {rows_single:>11} {rows_planned:>12} {len(forwards):>8} {best['single'] * 1e3:>9.1f} "
            f"{best['planned'] * 1e3:>10.1f} {speed_up:>8.2f} {best['alone'] * 1e3:>15.1f} {overhead:>26.2f}"
        )
    print(f"# sampled tokens identical, planned and single, in every step: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
