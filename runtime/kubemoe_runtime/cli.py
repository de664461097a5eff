"""`kubemoe-runtime`: the data plane's command line.

Subcommands so far:
    tiny-checkpoint OUT_DIR --arch ARCH      write a random tiny checkpoint (see checkpoints.py)
    generate --model PATH --prompt TEXT      greedy completion with the torch engine; with
                                             --data-parallel-size N --enable-expert-parallel it runs N
                                             local expert-parallel ranks (gloo) and prints rank 0's output;
                                             --redundant-experts and --expert-placement as `serve` takes them

    serve --model PATH ...                   one pod of a serving group: the OpenAI API on the torch
                                             engine (see serve.py for the flags, vLLM's names)
    serve --role router ...                  the router: OpenAI front door, P/D proxy (router/main.py)
    fill-cache --source hf://ORG/NAME --dir DIR
                                             fill a model cache folder once from the Hub, with progress
                                             on GET /progress (tools/model_cache/)

Engine flags use vLLM's names so one rendered pod command fits either engine.

Errors are one line on stderr, never a traceback (`kubemoe-runtime: error: ...`, exit 1; a bad flag or
input: exit 2); KUBEMOE_DEBUG=1 adds the traceback. `serve` reports its own start-up errors the same
way (serve.py, router/main.py); once it serves, its log keeps whatever stops it, traceback included.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubemoe_runtime.pod.messages import one_line
from kubemoe_runtime.pod.settings import DTYPE_NAMES

if TYPE_CHECKING:  # the engine is imported only where it runs
    from kubemoe_runtime.engines.torch.model.placement import Placement

PROG = "kubemoe-runtime"
DEBUG_ENV = "KUBEMOE_DEBUG"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Flags or input that cannot work: one line, exit 2."""


def report(prog: str, err: BaseException) -> None:
    """`PROG: error: ...` on stderr; the traceback first with KUBEMOE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
    with contextlib.suppress(OSError):  # stderr is gone too: nothing left to tell
        # one write of the whole line: the ranks of a group share the parent's stderr, and print()'s
        # separate write of "\n" could let another rank's line in between
        sys.stderr.write(f"{prog}: error: {one_line(err)}\n")
        sys.stderr.flush()


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The vLLM-named flags the torch engine understands."""
    parser.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-address", default="127.0.0.1")
    parser.add_argument("--data-parallel-rpc-port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots (see serve)")
    parser.add_argument("--expert-placement", type=Path, default=None, help="a placement file (see serve)")


@dataclass(frozen=True)
class GenerateJob:
    model: Path
    dtype: str
    prompt: str
    max_tokens: int
    ep_size: int
    address: str
    port: int
    placement: Placement | None = None


def _generate_rank(rank: int, job: GenerateJob) -> None:
    from tokenizers import Tokenizer

    from kubemoe_runtime.engines.torch import TorchEngine, init_expert_parallel
    from kubemoe_runtime.engines.torch.model.engine import DTYPES
    from kubemoe_runtime.engines.torch.model.parallel import leave_process, shutdown_expert_parallel

    ep = init_expert_parallel(rank=rank, size=job.ep_size, address=job.address, port=job.port)
    try:
        tokenizer = Tokenizer.from_file(str(job.model / "tokenizer.json"))
        engine = TorchEngine.load(job.model, dtype=DTYPES[job.dtype], ep=ep, placement=job.placement)
        prompt_ids = tokenizer.encode(job.prompt).ids
        [out] = engine.generate_greedy(
            [prompt_ids], max_new_tokens=job.max_tokens, stop_token_ids=engine.cfg.eos_token_ids
        )
        if rank == 0:
            report = engine.load_report
            print(tokenizer.decode(out))
            print(
                f"# ep={job.ep_size} experts {_ids(report.experts)} "
                f"read {report.bytes_read} bytes ({report.routed_expert_bytes} routed-expert)",
                file=sys.stderr,
            )
    finally:
        shutdown_expert_parallel(ep)
    if job.ep_size > 1:
        leave_process(0)


def _rank_process(rank: int, job: GenerateJob) -> None:
    """One expert-parallel rank of `generate` in its own process: a failure is one line naming the rank."""
    try:
        _generate_rank(rank, job)
    except Exception as err:
        report(f"{PROG} generate: rank {rank}", err)
        sys.exit(EXIT_ERROR)


def _ids(experts: Sequence[int]) -> str:
    """Expert ids shortly: `0..3` for a contiguous run, else the list."""
    if list(experts) == list(range(experts[0], experts[0] + len(experts))):
        return f"{experts[0]}..{experts[-1]}"
    return ",".join(map(str, experts))


def _generate(args: argparse.Namespace) -> int:
    from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
    from kubemoe_runtime.engines.torch.model.placement import (
        check_redundant,
        default_placement,
        read_placement_file,
    )
    from kubemoe_runtime.pod.ports import free_port

    ep_size = args.data_parallel_size if args.enable_expert_parallel else 1
    if args.data_parallel_size < 1:
        raise UsageError(f"--data-parallel-size {args.data_parallel_size}: give 1 or more")
    if args.data_parallel_size > 1 and not args.enable_expert_parallel:
        raise UsageError(
            "plain data parallelism is not supported by `generate`; add --enable-expert-parallel"
        )
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens}: give 1 or more")
    try:
        cfg = ModelConfig.load(Path(args.model))
    except (ValueError, OSError) as err:  # ConfigError: no config.json, not JSON, a model it cannot run
        raise UsageError(f"--model: {one_line(err)}") from err
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise UsageError(f"--model {args.model}: no tokenizer.json")
    shape = {"n_experts": cfg.n_routed_experts, "ranks": ep_size, "redundant": args.redundant_experts}
    layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    try:
        check_redundant(**shape)
        placement = (
            read_placement_file(args.expert_placement, layers=layers, **shape)
            if args.expert_placement is not None
            else default_placement(layers=layers, **shape)
        )
    except ValueError as err:
        raise UsageError(one_line(err)) from err
    job = GenerateJob(
        model=Path(args.model),
        dtype=args.dtype,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        ep_size=ep_size,
        address=args.data_parallel_address,
        port=args.data_parallel_rpc_port or free_port(),
        placement=placement,
    )
    if ep_size == 1:
        _generate_rank(0, job)
        return 0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_process, args=(rank, job)) for rank in range(ep_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        with contextlib.suppress(OSError):
            print(
                f"{PROG} generate: error: expert-parallel ranks failed (rank: exit code) {failed}",
                file=sys.stderr,
            )
        return EXIT_ERROR
    return 0


def _role(argv: Sequence[str]) -> str | None:
    """The value of `--role` in a `serve` argv, if any."""
    for i, arg in enumerate(argv):
        if arg == "--role" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--role="):
            return arg.removeprefix("--role=")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # a server: it reports its own start-up errors; later, its log has the rest
        return _serve(argv[1:])
    if argv[:1] == ["fill-cache"]:  # reports its own errors (and to the termination log); imports no torch
        from kubemoe_runtime.tools.model_cache import main as fill_cache_main

        return fill_cache_main(argv[1:])
    try:
        return _tools(argv)
    except UsageError as err:
        report(f"{PROG} {argv[0]}" if argv else PROG, err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        report(PROG, err)
        return EXIT_ERROR


def _serve(argv: list[str]) -> int:
    if _role(argv) == "router":
        from kubemoe_runtime.router.main import main as router_main

        return router_main(argv)
    # its own parser: a pod's argv may carry vLLM flags the torch engine ignores
    from kubemoe_runtime.serve import main as serve_main

    return serve_main(argv)


def _tools(argv: list[str]) -> int:
    from kubemoe_runtime.tools.checkpoints import ARCHITECTURES, write_tiny_checkpoint

    parser = argparse.ArgumentParser(prog="kubemoe-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-checkpoint", help="write a random tiny MoE checkpoint")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--arch", choices=ARCHITECTURES, default="qwen3_moe")
    tiny.add_argument("--seed", type=int, default=0)

    gen = sub.add_parser("generate", help="greedy completion of one prompt with the torch engine")
    add_engine_flags(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=16)

    sub.add_parser(
        "serve", help="serve the OpenAI API (flags: `kubemoe-runtime serve --help`)", add_help=False
    )
    sub.add_parser(
        "fill-cache",
        help="fill a model cache folder from the Hub (flags: `kubemoe-runtime fill-cache --help`)",
        add_help=False,
    )

    args = parser.parse_args(argv)
    if args.command == "tiny-checkpoint":
        print(write_tiny_checkpoint(args.out_dir, arch=args.arch, seed=args.seed))
        return 0
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
