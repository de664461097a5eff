"""The torch engine's KV cache in a plan: it allocates each rank's cache up front, (--max-num-seqs + 1) x
(maxModelLen + 1) positions (sizing.TorchKv), so a plan needs room for all of it; what the notes and the
refusals say of it."""

from __future__ import annotations

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import ModelDeploymentSpec, RoleName
from kubemoe_operator.plan.sizing import SUGGEST_HEADROOM_SEQUENCES, Sizing, TorchKv, torch_kv


def size_text(gib: float) -> str:
    """GiB for the notes, in MiB below one GiB (a tiny model's KV cache)."""
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def spec_torch_kv(spec: ModelDeploymentSpec) -> TorchKv | None:
    """The torch engine's up-front KV cache (its --max-num-seqs); None for the other engines."""
    return torch_kv(spec.engine.extra_args) if spec.engine.kind == "torch" else None


def headroom_words(kv: TorchKv | None, max_len: int) -> str:
    """What a suggested layout leaves room for: SUGGEST_HEADROOM_SEQUENCES sequences of max_len, or the torch
    engine's whole KV cache."""
    if kv is None:
        return f"KV for {SUGGEST_HEADROOM_SEQUENCES} sequences of {max_len} tokens"
    return f"the KV cache the torch engine allocates up front ({kv.shape(max_len)} per rank; {kv.flag()})"


def torch_kv_problem(
    sizing: Sizing, *, kv: TorchKv, name: RoleName, device: str, devices_per_pod: int, hint: str, more: str
) -> Problem:
    """The torch engine's KV cache does not fit what the weights leave: the fixes that keep the layout (a
    shorter maxModelLen, fewer --max-num-seqs), more memory, or a wider layout."""
    mem, max_len = sizing.memory, sizing.memory.max_model_len
    usable = mem.device_gib * mem.utilization - mem.reserve_gib
    cache = sizing.kv_cache_gib()
    seqs = sizing.budget_tokens // (max_len + 1) - 1  # the most --max-num-seqs that fits at maxModelLen
    # the memory a pod of this layout needs: each rank's weights, cache and reserve, over the utilisation
    pod_gib = (mem.weights_gib + mem.eplb_buffers_gib + cache + mem.reserve_gib) / mem.utilization
    pod_gib *= devices_per_pod
    keep = []
    if sizing.longest >= 1:
        keep.append(f"set engine.maxModelLen <= {sizing.longest}")
    if seqs >= 1:
        keep.append(f"pass --max-num-seqs {seqs} (or fewer) in engine.extraArgs")
    keep_text = " or ".join(keep) + " to keep this layout; or " if keep else ""
    return Problem(
        field="spec.engine.maxModelLen",
        message=f"the torch engine allocates each {name} rank's KV cache up front, {kv.shape(max_len)}"
        f" ({kv.flag()}) at {mem.kv_bytes_per_token / 1024:.1f} KiB each: {cache:.2f} GiB, more than the"
        f" {mem.kv_budget_gib:.2f} GiB KV budget per rank ({device} leaves {usable:.1f} GiB, less"
        f" {mem.weights_gib:.1f} GiB of weights); the pod would run out of memory. This layout needs about"
        f" {pod_gib:.1f} GiB a pod.",
        fix=f"{keep_text}{more}, or {hint}.",
    )
