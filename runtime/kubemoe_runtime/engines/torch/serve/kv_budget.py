"""How long a context the pod's KV caches can take: --max-model-len checked against the memory available
at start, or chosen where it is not given (the caches are allocated, and zero-filled, up front)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.engine import DTYPES
from kubemoe_runtime.pod.messages import human_bytes
from kubemoe_runtime.pod.settings import ServeSettings

# Without --max-model-len, the pod's KV caches take at most this share of the memory available at start:
# the weights, loaded next, and each step's activations need the rest.
KV_DEFAULT_SHARE: Final = 0.25
KV_FALLBACK_MAX_LEN: Final = 32768  # the default's cap where the available memory cannot be read
CGROUP: Final = Path("/sys/fs/cgroup")
MEMINFO: Final = Path("/proc/meminfo")


class MaxModelLenError(ValueError):
    """--max-model-len (given or chosen) does not fit: the message names the flags and the bytes."""


def kv_bytes_per_position(cfg: ModelConfig, dtype: str) -> int:
    """KV-cache bytes one position of one sequence takes in one rank: every layer's cache fields
    (model/layers.py `cache_fields`: keys and values of the KV heads, or MLA's latent and rotary key)."""
    per_layer = (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.uses_mla else 2 * cfg.num_kv_heads * cfg.head_dim
    )
    return cfg.num_layers * per_layer * DTYPES[dtype].itemsize


def kv_cache_bytes(cfg: ModelConfig, *, dtype: str, max_len: int, seqs: int, local_ranks: int) -> int:
    """The KV caches a pod's ranks allocate up front: each (seqs + 1) slots x (max_len + 1) positions
    (group.py's RankRunner: one spare slot for dummy rows, one spare position for padding)."""
    return local_ranks * (seqs + 1) * (max_len + 1) * kv_bytes_per_position(cfg, dtype)


def choose_max_model_len(
    settings: ServeSettings, cfg: ModelConfig, *, dtype: str, available: int | None
) -> tuple[int, str | None]:
    """The pod's max_model_len and, where it chose it, a line saying so; MaxModelLenError where the KV
    caches cannot fit `available` bytes (None: unknown) or --max-model-len is past the model's positions."""
    positions, seqs, local = (
        cfg.max_position_embeddings,
        settings.max_num_seqs,
        settings.data_parallel_size_local,
    )

    def need(max_len: int) -> int:
        return kv_cache_bytes(cfg, dtype=dtype, max_len=max_len, seqs=seqs, local_ranks=local)

    def most_within(budget: float) -> int:
        return int(budget) // need(0) - 1  # need(n) = (n + 1) * need(0)

    if settings.max_model_len is not None:
        max_len = settings.max_model_len
        if max_len > positions:
            raise MaxModelLenError(f"--max-model-len {max_len} exceeds the model's {positions} positions")
        if available is not None and need(max_len) > available:
            fits = most_within(available)
            hint = f"at most --max-model-len {fits} fits" if fits >= 2 else "not even --max-model-len 2 fits"
            raise MaxModelLenError(
                f"--max-model-len {max_len} with --max-num-seqs {seqs} needs {human_bytes(need(max_len))} "
                f"({need(max_len)} bytes) of KV cache, more than the {human_bytes(available)} of memory "
                f"available; {hint}: lower --max-model-len or --max-num-seqs"
            )
        return max_len, None
    if available is None:
        max_len = min(positions, KV_FALLBACK_MAX_LEN)
        why = f"the memory available is unknown, and the default is at most {KV_FALLBACK_MAX_LEN}"
    else:
        max_len = min(positions, most_within(KV_DEFAULT_SHARE * available))
        if 2048 <= max_len < positions:
            max_len -= max_len % 1024  # a round number
        why = (
            f"{positions} positions would need {human_bytes(need(positions))} of KV cache, more than "
            f"{KV_DEFAULT_SHARE:.0%} of the {human_bytes(available)} of memory available"
        )
        if max_len < 2:
            raise MaxModelLenError(
                f"--max-num-seqs {seqs}: a KV cache of even 2 positions a sequence takes more than "
                f"{KV_DEFAULT_SHARE:.0%} of the {human_bytes(available)} of memory available; lower "
                "--max-num-seqs"
            )
    kv = f"KV cache: {human_bytes(need(max_len))} for --max-num-seqs {seqs}"
    if max_len == positions:
        return max_len, (
            f"--max-model-len not given: serving the model's {positions} positions ({kv}); give "
            "--max-model-len to choose"
        )
    if local < settings.data_parallel_size:
        raise MaxModelLenError(
            f"give --max-model-len: the pods of a group over several pods must agree on it, and {why}"
        )
    return max_len, (
        f"--max-model-len not given: serving {max_len} of the model's {positions} positions ({kv}): {why}; "
        "give --max-model-len to choose"
    )


def available_memory() -> int | None:
    """Bytes this pod may still allocate: the machine's MemAvailable, or its cgroup's limit less its working
    set where that is less; None where neither can be read."""
    known = [n for n in (_meminfo_available(MEMINFO), _cgroup_room(CGROUP)) if n is not None]
    return min(known) if known else None


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path) -> int | None:
    """The cgroup's memory limit less its working set (usage less inactive file pages), v2 or v1."""
    layouts = (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    )
    for limit_file, usage_file, stat_file, inactive_key in layouts:
        try:
            limit = (root / limit_file).read_text().strip()
            if limit == "max":
                return None
            usage = int((root / usage_file).read_text())
            stats = dict(line.split() for line in (root / stat_file).read_text().splitlines() if line.strip())
            return max(0, int(limit) - usage + int(stats.get(inactive_key, 0)))
        except (OSError, ValueError):
            continue
    return None
