"""Expert rebalancing on a skewed workload (issue 17): rank load and decode tokens/s before and after, in one
run, on an EP=4 group of the torch engine.

The checkpoint: bigmoe.py's Qwen3-MoE layout (32 routed experts of 512, hidden 1024, top-4, bf16;
BENCH_LAYERS layers, default 6), random weights, written to a temporary directory and deleted after, with
its routing skewed Zipf-like: in each MoE layer SKEW.hot experts (drawn at random per layer) get a router
logit bias of strength / j**exponent for the j-th (the others none), on top of the random gate's own
logits. Qwen3's router is a bare linear map with no bias term, so the bias rides on a constant feature
(`skew_model`): every token embedding gets the value FEATURE_VALUE in hidden dimension FEATURE, no layer
writes that dimension (its row of every o_proj and expert down_proj is zero), so the residual stream
carries it unchanged to every layer; each layer's gate column FEATURE is set to bias / (the dimension's
mean value at that gate's input, measured on the bench's prompts). The same feature keeps the LM head
off the tokens that do not decode to printable ASCII on their own (special tokens, parts of a UTF-8
character), so every generated token streams as one chunk of text and chunks count tokens.

The group: `kubemoe-runtime serve --data-parallel-size 4 --enable-expert-parallel --redundant-experts 8`,
rank 0 in the serve process (with the API) and ranks 1-3 as its child processes, as a pod runs them; one
OMP thread each (tests/runtime/serving.py's Server), bf16; it starts on the default placement (rank r holds
experts 8r..8r+7 and copies of its own first two).

    warm-up    one batch of the streams below
    A          STREAMS concurrent greedy streaming completions (the PROMPTS in turn) of NEW_TOKENS tokens,
               EOS ignored; GET /v1/experts/load before and after: the difference is the phase's routing,
               and its imbalance the busiest rank's tokens over the mean rank's under the placement it ran
               (the endpoint's definition; the window only accumulates while the run is shorter than it)
    rebalance  plan/experts.py `balance` (the operator's algorithm) on phase A's load, POSTed to
               /v1/experts/placement as generation 1; GET until the group runs it
    B          the same streams under it, the same counts
    rounds     ROUNDS - 1 more pairs (default placement posted back, A; the rebalanced one again, B): the
               machine's noise shows in the spread of the rounds' ratios, and the median is reported
    alone      ALONE prompts, one request at a time (the same batch whatever the placement), after the
               first A and B, for the greedy outputs' equality; repeated on a float32 group of the same
               checkpoint, default placement then the same rebalanced one

Decode tokens/s: chunks (tokens) streamed while every stream of a phase is decoding (from the last stream's
first token to the first stream's last), over that time. The overall imbalance is the operator's
(rebalance/choose.py): the sum over layers of the busiest rank's tokens over the sum of the mean rank's, as
a step waits at each MoE layer for its busiest rank.

Env: BENCH_LAYERS (6), BENCH_STREAMS (64: 16 per rank, the ranks' default KV slots), BENCH_DECODE (new
tokens per stream, 32), BENCH_ROUNDS (5), BENCH_KEEP_LOGS=1 (keep the servers' logs).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from bigmoe import VOCAB, Layout, qwen3_config, save
from loopback import log_dir

from kubemoe_operator.plan.experts import balance, rank_loads
from kubemoe_operator.rebalance.loop import placement_doc
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.tools.checkpoints import write_tokenizer
from tests.runtime.serving import Server, http_get, http_post

RANKS: Final = 4
REDUNDANT: Final = 8  # two spare slots a rank: S = (32 + 8) / 4 = 10
STREAMS: Final = int(os.environ.get("BENCH_STREAMS", "64"))
NEW_TOKENS: Final = int(os.environ.get("BENCH_DECODE", "32"))
ROUNDS: Final = int(os.environ.get("BENCH_ROUNDS", "5"))
ALONE: Final = 8  # prompts run one at a time to compare greedy outputs across the switch
ALONE_TOKENS: Final = 16
GOAL: Final = 1.15  # issue 17: the busiest rank within 1.15x of the mean
MODEL: Final = "skewed"
FEATURE: Final = 0  # the hidden dimension that carries the constant feature
FEATURE_VALUE: Final = 0.2  # against embeddings of std 0.02: the token still dominates its embedding
BANNED_LOGIT: Final = 30.0  # how far down the LM head pushes tokens that stream no text of their own

PROMPTS: Final = (
    "The router sends each token to the experts of one layer, and the ranks compute them.",
    "Why does the busiest rank decide how fast a batch of requests can decode?",
    "Please scale the decode pods when the load is large and the cache is full.",
    "Hello world, this is a question about sparse mixture models on a cluster.",
    "Experts that are hot should have a copy on another rank, or the layer waits.",
    "Which node holds the weights of expert seven, and how large is its memory?",
    "A tensor of hidden states is gathered across ranks, then reduced after the experts.",
    "The operator will route requests to the replica with the smallest queue.",
    "Two hundred tokens were routed to one expert while the others had ten.",
    "If the kernel is slow then the sequence of decode steps is slow as well.",
    "Thank you for the answer: the shard of the model was loaded from the cache.",
    "What should the deployment do when one rank computes four experts and another none?",
    "Attention is dense and the experts are sparse, so the load can differ between ranks.",
    "Serving a large model over eight gpus needs a fast dispatch and a fast combine.",
    "These weights have been split into shards, one per rank of the group.",
    "How many requests can the batch hold before the prefill becomes slow?",
)


# --- the skewed checkpoint ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Skew:
    """Zipf-like routing: in each layer `hot` experts (at random) get logit bias strength / j**exponent."""

    hot: int = 6
    strength: float = 2.5
    exponent: float = 1.0
    seed: int = 0


SKEW: Final = Skew()


def zipf_biases(*, n_experts: int, n_layers: int, skew: Skew) -> list[list[float]]:
    """Per layer, each expert's router logit bias: the j-th of `skew.hot` experts drawn at random (seeded)
    gets strength / j**exponent, the others 0."""
    if not 0 < skew.hot <= n_experts:
        raise ValueError(f"hot={skew.hot} must be in 1..{n_experts}")
    rng = random.Random(skew.seed)
    biases = []
    for _ in range(n_layers):
        bias = [0.0] * n_experts
        for j, expert in enumerate(rng.sample(range(n_experts), skew.hot), start=1):
            bias[expert] = skew.strength / j**skew.exponent
        biases.append(bias)
    return biases


def plain_tokens(tokenizer: Any, *, vocab_size: int) -> list[bool]:
    """Which token ids decode, alone, to printable ASCII: not a special token, not part of a UTF-8
    character (the server streams such a token's text only once its character is complete)."""
    plain = []
    for i in range(vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=True)
        plain.append(bool(text) and all(" " <= c <= "~" for c in text))
    return plain


def skew_model(
    model: Any,
    biases: Sequence[Sequence[float]],
    prompts: Sequence[Sequence[int]],
    *,
    plain: Sequence[bool] | None = None,
) -> list[float]:
    """Skew a transformers Qwen3-MoE model's routing in place (the module docstring), and push the logits of
    the tokens that are not `plain` down by BANNED_LOGIT. Returns the mean value of dimension FEATURE at
    each layer's gate input, which the layer's biases were divided by."""
    layers = model.model.layers
    if len(biases) != len(layers):
        raise ValueError(f"{len(biases)} bias rows for {len(layers)} layers")
    seen: list[list[float]] = [[] for _ in range(len(layers) + 1)]  # each gate's input, then the LM head's

    def recorder(i: int) -> Any:
        def record(_: Any, args: tuple[torch.Tensor, ...]) -> None:
            seen[i].extend(args[0].reshape(-1, args[0].shape[-1])[:, FEATURE].float().tolist())

        return record

    with torch.no_grad():
        model.model.embed_tokens.weight[:, FEATURE] = FEATURE_VALUE
        hooks = [model.lm_head.register_forward_pre_hook(recorder(len(layers)))]
        for i, layer in enumerate(layers):
            layer.self_attn.o_proj.weight[FEATURE, :] = 0.0  # no layer writes the feature's dimension
            layer.mlp.experts.down_proj[:, FEATURE, :] = 0.0
            layer.mlp.gate.weight[:, FEATURE] = 0.0
            hooks.append(layer.mlp.gate.register_forward_pre_hook(recorder(i)))
        try:
            for ids in prompts:
                model(input_ids=torch.tensor([list(ids)]))
        finally:
            for hook in hooks:
                hook.remove()
        means = [math.fsum(values) / len(values) for values in seen]
        for layer, bias, mean in zip(layers, biases, means, strict=False):
            weight = layer.mlp.gate.weight
            weight[:, FEATURE] = torch.tensor(bias, dtype=weight.dtype) / mean
        if plain is not None:
            banned = torch.tensor([not ok for ok in plain])
            model.lm_head.weight[banned, FEATURE] = -BANNED_LOGIT / means[-1]
    return means[:-1]


def write_checkpoint(out: Path, layout: Layout, skew: Skew) -> list[list[float]]:
    """The skewed bf16 checkpoint in `out`; returns the biases."""
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeForCausalLM

    vocab = write_tokenizer(out, vocab_size=VOCAB)
    model_cls: Any = Qwen3MoeForCausalLM
    torch.manual_seed(skew.seed)
    model = model_cls(qwen3_config(layout, vocab_size=vocab))
    model.eval()
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    biases = zipf_biases(n_experts=layout.experts, n_layers=layout.layers, skew=skew)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    skew_model(model, biases, prompts, plain=plain_tokens(tokenizer, vocab_size=vocab))
    save(model.to(torch.bfloat16), out, layout, max_shard_size="200MB")
    return biases


# --- the pure parts: load windows, placements, rates, the report ----------------------------------------


def window_diff(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> list[list[int]]:
    """Tokens routed between two reads of GET /v1/experts/load (the window only accumulates here)."""
    diff = [[b - a for a, b in zip(x, y, strict=True)] for x, y in zip(before, after, strict=True)]
    if any(v < 0 for row in diff for v in row):
        raise ValueError("the load window lost tokens between two reads: the run outlasted the window")
    return diff


def overall_imbalance(
    tokens: Sequence[Sequence[int]], slots: Sequence[Sequence[int]], *, ranks: int
) -> float:
    """Sum over layers of the busiest rank's tokens over the sum of the mean rank's (rebalance/choose.py)."""
    busiest = mean = 0.0
    for load, layer_slots in zip(tokens, slots, strict=True):
        loads = rank_loads(load, layer_slots, ranks=ranks)
        busiest += max(loads)
        mean += math.fsum(loads) / ranks
    return busiest / mean if mean > 0 else 1.0


def layer_imbalances(
    tokens: Sequence[Sequence[int]], slots: Sequence[Sequence[int]], *, ranks: int
) -> list[float]:
    return [overall_imbalance([t], [s], ranks=ranks) for t, s in zip(tokens, slots, strict=True)]


def shared_core_bound(
    tokens: Sequence[Sequence[int]], slots: Sequence[Sequence[int]], *, ranks: int, cores: int
) -> float:
    """The least time the routed experts of a step can take, in mean-rank units summed over layers, when
    `ranks` processes share `cores` cores: a layer waits for its busiest rank, and the cores can do no more
    than `cores` ranks' work at once, so each layer takes at least max(busiest, total / cores).
    With cores >= ranks, `overall_imbalance`."""
    bound = mean = 0.0
    for load, layer_slots in zip(tokens, slots, strict=True):
        loads = rank_loads(load, layer_slots, ranks=ranks)
        bound += max(*loads, math.fsum(loads) / min(cores, ranks))
        mean += math.fsum(loads) / ranks
    return bound / mean if mean > 0 else 1.0


def placement_document(
    generation: int, *, layers: Sequence[int], slots: Sequence[Sequence[int]], ranks: int
) -> dict[str, Any]:
    """The body of POST /v1/experts/placement: the operator's own (rebalance/loop.py)."""
    return placement_doc(generation, layers=tuple(layers), slots=tuple(tuple(s) for s in slots), ranks=ranks)


def rebalanced_slots(tokens: Sequence[Sequence[int]], *, ranks: int, redundant: int) -> list[list[int]]:
    """The operator's placement for this load: plan/experts.py `balance`."""
    return [list(p.slots) for p in balance(tokens, ranks=ranks, redundant=redundant)]


def decode_rate(arrivals: Sequence[Sequence[float]]) -> float:
    """Tokens/s while every stream decodes: the tokens that arrived after the last stream's first one and
    up to the first stream's last one, over that time. `arrivals`: each stream's token times."""
    if not arrivals or any(not times for times in arrivals):
        raise ValueError("a stream received no tokens")
    start = max(times[0] for times in arrivals)
    end = min(times[-1] for times in arrivals)
    if end <= start:
        raise ValueError("no time in which every stream was decoding: too few tokens per stream")
    count = sum(1 for times in arrivals for t in times if start < t <= end)
    return count / (end - start)


@dataclass(frozen=True)
class Phase:
    generation: int
    tokens: list[list[int]]  # routed in this phase, per MoE layer and expert
    slots: list[list[int]]  # the placement it ran under
    rate: float  # decode tokens/s
    texts: list[str]
    seconds: float
    cpu: list[float] | None = None  # CPU seconds of each rank's process in the phase

    @property
    def imbalance(self) -> float:
        return overall_imbalance(self.tokens, self.slots, ranks=RANKS)

    @property
    def layers(self) -> list[float]:
        return layer_imbalances(self.tokens, self.slots, ranks=RANKS)


@dataclass(frozen=True)
class Outputs:
    """Greedy outputs of the ALONE prompts run one at a time, before and after the switch."""

    bf16: tuple[list[str], list[str]]
    float32: tuple[list[str], list[str]] | None


def _same(pair: tuple[Sequence[str], Sequence[str]]) -> str:
    return f"{sum(a == b for a, b in zip(*pair, strict=True))}/{len(pair[0])}"


def _mean_cpu(phases: Sequence[Phase]) -> list[float] | None:
    if any(p.cpu is None for p in phases):
        return None
    return [statistics.fmean(col) for col in zip(*(p.cpu or [] for p in phases), strict=True)]


def report(
    before: Sequence[Phase],
    after: Sequence[Phase],
    *,
    layers: Sequence[int],
    predicted: Sequence[float],
    outputs: Outputs,
    cores: int,
) -> list[str]:
    """The table (imbalance per layer and overall: phase A under the default placement, predicted for the
    new one, phase B under it), the goal, the rates of every round, what the cores allow, and the greedy
    outputs' equality. `before[i]` and `after[i]` are round i's phases."""
    first, then = before[0], after[0]
    lines = [f"{'layer':>7} {'hottest':>8} {'before':>7} {'predicted':>9} {'after':>7}"]
    for i, layer in enumerate(layers):
        load = first.tokens[i]
        hottest = max(load) * len(load) / sum(load) if sum(load) else 1.0
        lines.append(
            f"{layer:>7} {hottest:>7.2f}x {first.layers[i]:>7.3f} {predicted[i]:>9.3f} {then.layers[i]:>7.3f}"
        )
    lines.append(f"{'all':>7} {'':>8} {first.imbalance:>7.3f} {'':>9} {then.imbalance:>7.3f}")
    lines.append(
        "# imbalance: busiest rank's tokens / mean rank's (max/mean rank load), measured in phase A (default "
        "placement) and phase B (rebalanced); hottest: busiest expert's tokens / mean expert's, phase A"
    )
    worst = max(then.layers)
    met = then.imbalance <= GOAL and worst <= GOAL
    lines.append(
        f"# goal, busiest rank within {GOAL:.2f}x of the mean (overall and in every layer): "
        f"{'met' if met else 'NOT met'}: {first.imbalance:.3f} -> {then.imbalance:.3f} overall, worst layer "
        f"{max(first.layers):.3f} -> {worst:.3f}"
    )
    ratios = []
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        ratios.append(b.rate / a.rate)
        lines.append(
            f"# round {i + 1}: decode tok/s default (generation {a.generation}) {a.rate:.1f}, rebalanced "
            f"(generation {b.generation}) {b.rate:.1f}: {ratios[-1]:.2f}x"
        )
    rate_a = statistics.median(p.rate for p in before)
    rate_b = statistics.median(p.rate for p in after)
    lines.append(
        f"# decode tok/s, median of {len(ratios)} rounds: default {rate_a:.1f}, rebalanced {rate_b:.1f}; "
        f"rebalanced/default {statistics.median(ratios):.2f}x (the rounds {min(ratios):.2f}x .. "
        f"{max(ratios):.2f}x)"
    )
    cpu_a, cpu_b = _mean_cpu(before), _mean_cpu(after)
    if cpu_a is not None and cpu_b is not None:
        lines.append(
            "# CPU s per rank and phase, rank 0..3 (rank 0 also serves the streams): default "
            f"[{', '.join(f'{c:.2f}' for c in cpu_a)}], rebalanced [{', '.join(f'{c:.2f}' for c in cpu_b)}]; "
            f"the busiest rank's {max(cpu_a):.2f} -> {max(cpu_b):.2f} ({max(cpu_a) / max(cpu_b):.2f}x; other "
            "load on the cores disturbs CPU time less than wall time; on dedicated cores a phase lasts at "
            "least its busiest rank's CPU time)"
        )
    here_a = shared_core_bound(first.tokens, first.slots, ranks=RANKS, cores=cores)
    here_b = shared_core_bound(then.tokens, then.slots, ranks=RANKS, cores=cores)
    lines.append(
        f"# the routed experts of a step take at least max(busiest rank, all ranks' work / cores) per layer: "
        f"on these {cores} cores {here_a:.2f} -> {here_b:.2f} mean-rank units ({here_a / here_b:.2f}x); on "
        f"{RANKS} dedicated cores or GPUs {first.imbalance:.2f} -> {then.imbalance:.2f} "
        f"({first.imbalance / then.imbalance:.2f}x)"
    )
    lines.append(
        f"# greedy outputs, each prompt alone, identical before/after the switch: bf16 {_same(outputs.bf16)}"
        + (f", float32 {_same(outputs.float32)}" if outputs.float32 is not None else "")
    )
    lines.append(
        "# (float32 is the equality check; in bf16 each rank's partial sum of a token's experts is rounded "
        "to bf16 before the all-reduce, and a new placement regroups those sums, so near-tied greedy "
        "choices of random weights may flip)"
    )
    control = (
        f"; between two default-placement phases (rounds 1 and {len(before)}): "
        f"{_same((first.texts, before[-1].texts))}"
        if len(before) > 1
        else ""
    )
    lines.append(
        f"# concurrent streams (bf16), identical before/after: {_same((first.texts, then.texts))}{control}"
    )
    return lines


# --- the run ------------------------------------------------------------------------------------------


def stream(url: str, prompt: str, *, go: threading.Barrier, out: dict[str, Any]) -> None:
    """One greedy streaming completion; records each chunk's arrival time and the text."""
    host, port = url.removeprefix("http://").split(":")
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        go.wait()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            out["error"] = f"{response.status}: {response.read()[:300]!r}"
            return
        times: list[float] = []
        parts: list[str] = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                parts.append(chunk["choices"][0]["text"])
        out["times"], out["text"] = times, "".join(parts)
    finally:
        conn.close()


def run_streams(url: str, n: int) -> tuple[list[list[float]], list[str], float]:
    go = threading.Barrier(n + 1)
    outs: list[dict[str, Any]] = [{} for _ in range(n)]
    threads = [
        threading.Thread(
            target=stream, args=(url, PROMPTS[i % len(PROMPTS)]), kwargs={"go": go, "out": outs[i]}
        )
        for i in range(n)
    ]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors := [o.get("error", "no answer") for o in outs if "times" not in o]:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[0]}")
    return [o["times"] for o in outs], [o["text"] for o in outs], seconds


def get_load(server: Server) -> dict[str, Any]:
    status, body = http_get(f"{server.url}/v1/experts/load")
    if status != 200:
        raise RuntimeError(f"GET /v1/experts/load: {status} {body[:300]}")
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def rank_pids(server: Server) -> list[int] | None:
    """The serve process (rank 0) and its spawned rank processes (1, 2, 3 in start order); None if not
    found (not Linux, or a rank gone)."""
    root = server.process.pid
    children = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == root and "spawn_main" in command:
                    children.append(int(entry))
    return [root, *sorted(children)] if len(children) == RANKS - 1 else None


def cpu_seconds(pids: Sequence[int]) -> list[float]:
    """User + system CPU seconds of each process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)
    return out


def phase(server: Server, pids: Sequence[int] | None) -> Phase:
    first = get_load(server)
    cpu_first = cpu_seconds(pids) if pids else None
    arrivals, texts, seconds = run_streams(server.url, STREAMS)
    cpu_last = cpu_seconds(pids) if pids else None
    last = get_load(server)
    if last["span_seconds"] >= last["window_seconds"]:
        raise RuntimeError("the run outlasted the load window: a phase's counts are no longer its own")
    if first["placement"]["generation"] != last["placement"]["generation"]:
        raise RuntimeError("the placement changed during a phase")
    tokens = window_diff([x["tokens"] for x in first["layers"]], [x["tokens"] for x in last["layers"]])
    cpu = None
    if cpu_first is not None and cpu_last is not None:
        cpu = [b - a for a, b in zip(cpu_first, cpu_last, strict=True)]
    return Phase(
        generation=last["placement"]["generation"],
        tokens=tokens,
        slots=[x["slots"] for x in last["layers"]],
        rate=decode_rate(arrivals),
        texts=texts,
        seconds=seconds,
        cpu=cpu,
    )


def alone(server: Server) -> list[str]:
    """The first ALONE prompts, one request at a time: every rank runs the same batch whatever the
    placement, so only the placement differs between two such runs."""
    texts = []
    for prompt in PROMPTS[:ALONE]:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": ALONE_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        status, answer = http_post(f"{server.url}/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"POST /v1/completions: {status} {answer}")
        texts.append(answer["choices"][0]["text"])
    return texts


def switch(server: Server, document: dict[str, Any], *, timeout: float = 120.0) -> float:
    """POST a placement and wait until the group runs it; returns the seconds it took."""
    started = time.perf_counter()
    status, answer = http_post(f"{server.url}/v1/experts/placement", document)
    if status not in (200, 202):
        raise RuntimeError(f"POST /v1/experts/placement: {status} {answer}")
    while time.perf_counter() - started < timeout:
        placement = get_load(server)["placement"]
        if placement["generation"] == document["generation"]:
            return time.perf_counter() - started
        if placement["pending_generation"] is None and placement["error"]:
            raise RuntimeError(f"the switch failed: {placement['error']}")
        time.sleep(0.1)
    raise RuntimeError(f"generation {document['generation']} not applied after {timeout}s")


@contextlib.contextmanager
def group(model_dir: Path, *, dtype: str, logs: Path) -> Iterator[Server]:
    args = ["--served-model-name", MODEL, "--dtype", dtype, "--max-model-len", "256"]
    args += ["--data-parallel-size", str(RANKS), "--enable-expert-parallel"]
    args += ["--redundant-experts", str(REDUNDANT)]
    server = Server(model_dir, args=args, log_dir=logs, name=f"ep{RANKS}-{dtype}")
    try:
        started = time.perf_counter()
        server.wait_ready(timeout=600)
        print(f"# {dtype} group ready in {time.perf_counter() - started:.0f} s")
        yield server
    finally:
        server.stop()


def cpu_line(cores: int) -> str:
    flags = moe_kernel.cpu_flags()
    shown = " ".join(f for f in moe_kernel.SHOWN_FLAGS if f in flags) or "none of interest"
    return (
        f"# CPU {platform.machine()}, flags: {shown}; {cores} cores; torch {torch.__version__}, ATen "
        f"{torch.backends.cpu.get_cpu_capability()}, MoE routed experts: {moe_kernel.path()}"
    )


def main() -> None:
    layout = Layout(layers=int(os.environ.get("BENCH_LAYERS", "6")))
    cores = len(os.sched_getaffinity(0))
    print(cpu_line(cores))
    print(
        f"# model {layout.name} (random weights), routing skewed: {SKEW.hot} hot experts a layer, logit "
        f"bias {SKEW.strength}/j^{SKEW.exponent}"
    )
    print(
        f"# EP={RANKS}: {RANKS} rank processes, one thread each, on {cores} cores"
        + (
            " -- oversubscribed: the ranks take turns on the cores, so a rank that finishes its experts "
            "early frees its core for a busy one, and balancing saves less wall time than on "
            f"{RANKS} dedicated cores (or GPUs), where every MoE layer waits for the busiest rank alone; "
            "max/mean rank load is the machine-independent figure"
            if cores < RANKS
            else ""
        )
    )
    print(
        f"# {STREAMS} concurrent greedy streams x {NEW_TOKENS} tokens a phase, {ROUNDS} rounds of "
        f"(default, rebalanced); {REDUNDANT} redundant slots"
    )
    with tempfile.TemporaryDirectory(prefix="kubemoe-bench-skewed-") as scratch, log_dir() as logs:
        model_dir = Path(scratch)
        started = time.perf_counter()
        write_checkpoint(model_dir, layout, SKEW)
        print(f"# checkpoint written in {time.perf_counter() - started:.0f} s")
        with group(model_dir, dtype="bfloat16", logs=logs) as server:
            pids = rank_pids(server)
            run_streams(server.url, STREAMS)  # warm-up: the batch's shapes, first touches
            layers = [x["layer"] for x in get_load(server)["layers"]]
            before = [phase(server, pids)]  # generation 0: the default placement
            default = before[0].slots
            slots = rebalanced_slots(before[0].tokens, ranks=RANKS, redundant=REDUNDANT)
            predicted = layer_imbalances(before[0].tokens, slots, ranks=RANKS)
            alone_before = alone(server)
            took = switch(server, placement_document(1, layers=layers, slots=slots, ranks=RANKS))
            print(f"# generation 1 (rebalanced) applied {took:.1f} s after the POST")
            after = [phase(server, pids)]
            alone_after = alone(server)
            for generation in range(2, 2 * ROUNDS, 2):  # later rounds: back to the default, then again
                switch(server, placement_document(generation, layers=layers, slots=default, ranks=RANKS))
                before.append(phase(server, pids))
                switch(server, placement_document(generation + 1, layers=layers, slots=slots, ranks=RANKS))
                after.append(phase(server, pids))
        with group(model_dir, dtype="float32", logs=logs) as server:
            exact_before = alone(server)
            switch(server, placement_document(1, layers=layers, slots=slots, ranks=RANKS))
            exact_after = alone(server)
    took_s = ", ".join(f"{a.seconds:.0f}+{b.seconds:.0f}" for a, b in zip(before, after, strict=True))
    print(f"# phases took {took_s} s (default+rebalanced, each round)")
    outputs = Outputs(bf16=(alone_before, alone_after), float32=(exact_before, exact_after))
    for line in report(before, after, layers=layers, predicted=predicted, outputs=outputs, cores=cores):
        print(line)


if __name__ == "__main__":
    main()
