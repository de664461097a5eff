"""Sharded safetensors loading for one expert-parallel rank.

A Hugging Face checkpoint is a set of shards plus `model.safetensors.index.json` (tensor name -> shard).
An expert-parallel (EP) rank needs every dense, attention, norm, router and shared-expert tensor, but only
the routed experts of its slots. By default ownership is contiguous: with E experts over N ranks, rank r
owns `expert_range(n_experts=E, ep_rank=r, ep_size=N)` (the first E % N ranks own one extra when N does
not divide E), the same split vLLM uses. A placement (model/placement.py) gives each MoE layer its own
list of slot experts instead (`slots`); an expert a rank holds in two slots is read once (the caller
copies it into each slot). `load_expert_tensors` reads just some layers' routed experts: what a rank
newly holds when the placement changes while it serves; its caller may cancel it (`cancelled`, checked
before each shard and between reads of at most READ_CHUNK bytes: `LoadCancelled`), so an abandoned load
stops early instead of reading on.

Fused experts (Llama 4): a MoE layer stores all its experts in two tensors, `...experts.gate_up_proj`
[E, D, 2F] and `...experts.down_proj` [E, F, D]. Expert e's part of each is one contiguous span of the
tensor's bytes, so a rank still reads only its own experts: the loader names each expert's part a piece,
`...experts.{e}.gate_up_proj` (`fused_source` maps it back), selects and reads pieces as it does any
tensor, and validates the whole tensor's header entry.

`load_rank_weights` plans from the index and the config, checks each shard's header (present, not
truncated, every needed tensor present with the shape config.json implies and the checkpoint's dtype)
before reading a byte of data, then reads only the selected tensors and reports the bytes it read. Its two
halves are callable apart: `plan_rank_weights` (the index and every header this rank needs, each shard's
header read once, all checked: a `WeightPlan`) and `read_planned` (the data). The engine sizes the buffers
it reads experts into from a plan's checked shapes, so a config.json that disagrees with its checkpoint
fails by name before anything is allocated from its sizes.
The checkpoint is untrusted input: `checkpoint_files` keeps shard names inside the folder and checks
every header entry (bounded header, spans in the file, dtype x shape bytes, no overlaps), so a read
never leaves a tensor's own bytes. Every failure is a `WeightLoadError` naming the shard file and the
tensor.

Reading: the header gives each tensor's byte range, so the loader reads them itself (no mmap): per shard,
the selected tensors in file order, each run of adjacent ones with one readinto() into one buffer the
tensors are views of. Memory is touched once, as a plain read() of those bytes touches it; at EP=1 a
shard is one read, and at EP=N a rank's experts are one read per contiguous block. A caller may give
destinations (`into`): a tensor with one is read straight into it, e.g. into its slice of the engine's
stacked experts, so those bytes are never copied again.

Progress (#20): a `LoadProgress` given to `load_rank_weights` learns the bytes the rank will read once the
headers are checked (before a byte of data), then counts each readinto(); it logs bytes done/total and the
percentage at least every LOG_EVERY_S seconds or every LOG_EVERY_FRACTION of the total, whichever comes
first, and any thread may read it (the pod's `/ready` answers with it while the rank loads).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import torch

from kubemoe_runtime.engines.torch.load.checkpoint_files import (
    INDEX_FILE,
    TensorInfo,
    WeightLoadError,
    read_header,
    read_index,
    shard_path,
)
from kubemoe_runtime.engines.torch.load.model_config import LLAMA4_TYPES, ModelConfig
from kubemoe_runtime.pod.messages import human_bytes

__all__ = [
    "INDEX_FILE",
    "SAFETENSORS_DTYPES",
    "SINGLE_FILE",
    "LoadCancelled",
    "LoadProgress",
    "LoadReport",
    "TensorInfo",
    "WeightLoadError",
    "WeightPlan",
    "checkpoint_shapes",
    "expert_range",
    "fused_source",
    "load_expert_tensors",
    "load_rank_weights",
    "loadable_names",
    "plan_rank_weights",
    "read_planned",
    "read_weight_map",
    "routed_expert_id",
    "routed_expert_names",
    "select_tensors",
]

log = logging.getLogger("kubemoe_runtime.load")

READ_CHUNK: Final = 16 << 20  # bytes per readinto() call
LOG_EVERY_S: Final = 5.0  # LoadProgress logs at least this often while bytes arrive ...
LOG_EVERY_FRACTION: Final = 0.1  # ... and at each further tenth of the total
SINGLE_FILE: Final = "model.safetensors"

# safetensors dtype tags -> torch dtypes (only those a checkpoint we serve may hold).
SAFETENSORS_DTYPES: Final[dict[str, torch.dtype]] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_ROUTED_EXPERT: Final = re.compile(r"\.experts\.(\d+)\.")
_FUSED: Final = re.compile(r"^(.+\.experts)\.(gate_up_proj|down_proj)$")  # every expert of a layer
_FUSED_PIECE: Final = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_up_proj|down_proj)$")  # one expert's part
_LAYER_INDEX: Final = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")


class LoadCancelled(Exception):
    """A load stopped because its caller's `cancelled()` became true (load_expert_tensors)."""


def _stop_if(cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise LoadCancelled


# Tensors a checkpoint may keep in float32 whatever its main dtype (DeepSeek-V3 ships its routing bias so).
_FP32_ALLOWED: Final = ("e_score_correction_bias",)


def expert_range(*, n_experts: int, ep_rank: int, ep_size: int) -> range:
    """The contiguous block of routed-expert ids that `ep_rank` of `ep_size` owns."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} is outside 0..{ep_size - 1}")
    if ep_size > n_experts:
        raise ValueError(f"expert parallel size {ep_size} exceeds the {n_experts} routed experts")
    base, extra = divmod(n_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return range(start, start + base + (1 if ep_rank < extra else 0))


def routed_expert_id(name: str) -> int | None:
    """The routed-expert id in a tensor name (`...mlp.experts.7.up_proj.weight` -> 7); None otherwise.

    Shared experts (`...mlp.shared_experts.up_proj.weight`) do not match: every rank holds them.
    """
    match = _ROUTED_EXPERT.search(name)
    return int(match.group(1)) if match else None


def fused_source(name: str) -> tuple[str, int] | None:
    """A fused expert tensor's piece (`...experts.3.gate_up_proj`: expert 3's part of
    `...experts.gate_up_proj`) -> (the stored tensor's name, the expert); None for any other name."""
    match = _FUSED_PIECE.match(name)
    return (f"{match.group(1)}.{match.group(3)}", int(match.group(2))) if match else None


def _stored(name: str) -> str:
    """The checkpoint tensor that holds `name`'s bytes: itself, or a piece's fused tensor."""
    source = fused_source(name)
    return name if source is None else source[0]


def loadable_names(expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What a rank chooses from: every checkpoint tensor, a fused expert tensor as one piece per expert."""
    names: list[str] = []
    for name, shape in expected.items():
        fused = _FUSED.match(name)
        if fused is None:
            names.append(name)
        else:
            names += [f"{fused.group(1)}.{e}.{fused.group(2)}" for e in range(shape[0])]
    return names


def _ffn(cfg: ModelConfig, layer: int) -> str:
    """The checkpoint prefix of a layer's MLP or MoE block."""
    block = (
        "feed_forward" if cfg.arch in LLAMA4_TYPES else {"mixtral": "block_sparse_moe"}.get(cfg.arch, "mlp")
    )
    return f"{cfg.weight_prefix}model.layers.{layer}.{block}"


def routed_expert_names(cfg: ModelConfig, layer: int, expert: int) -> tuple[str, ...]:
    """The checkpoint names of routed expert `expert` of MoE layer `layer`: gate, up and down projections;
    with fused experts (Llama 4) the expert's pieces of gate_up_proj and down_proj."""
    prefix = f"{_ffn(cfg, layer)}.experts"
    if cfg.fused_experts:
        return f"{prefix}.{expert}.gate_up_proj", f"{prefix}.{expert}.down_proj"
    names = ("w1", "w3", "w2") if cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return tuple(f"{prefix}.{expert}.{name}.weight" for name in names)


def default_slots(cfg: ModelConfig, *, ep_rank: int, ep_size: int) -> dict[int, range]:
    """Each MoE layer's slot experts under the contiguous default: this rank's `expert_range`."""
    experts = expert_range(n_experts=cfg.n_routed_experts, ep_rank=ep_rank, ep_size=ep_size)
    return {layer: experts for layer, moe in enumerate(cfg.moe_layers) if moe}


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, by Hugging Face name, with the shape config.json implies (a
    multimodal checkpoint's other tensors, e.g. a vision encoder, are not needed: LoadReport.skipped)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    top = cfg.weight_prefix
    shapes: dict[str, tuple[int, ...]] = {
        f"{top}model.embed_tokens.weight": (v, d),
        f"{top}model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes[f"{top}lm_head.weight"] = (v, d)

    def mlp(prefix: str, hidden: int, names: tuple[str, str, str]) -> None:
        gate, up, down = names
        shapes[f"{prefix}.{gate}.weight"] = (hidden, d)
        shapes[f"{prefix}.{up}.weight"] = (hidden, d)
        shapes[f"{prefix}.{down}.weight"] = (d, hidden)

    for i in range(cfg.num_layers):
        p = f"{top}model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        a = f"{p}.self_attn"
        if cfg.uses_mla:
            qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            if cfg.q_lora_rank is None:
                shapes[f"{a}.q_proj.weight"] = (cfg.num_heads * qk, d)
            else:
                shapes[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, d)
                shapes[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
                shapes[f"{a}.q_b_proj.weight"] = (cfg.num_heads * qk, cfg.q_lora_rank)
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
            shapes[f"{a}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
            shapes[f"{a}.kv_b_proj.weight"] = (
                cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            )
            shapes[f"{a}.o_proj.weight"] = (d, cfg.num_heads * cfg.v_head_dim)
        else:
            hd = cfg.head_dim
            shapes[f"{a}.q_proj.weight"] = (cfg.num_heads * hd, d)
            shapes[f"{a}.k_proj.weight"] = (cfg.num_kv_heads * hd, d)
            shapes[f"{a}.v_proj.weight"] = (cfg.num_kv_heads * hd, d)
            shapes[f"{a}.o_proj.weight"] = (d, cfg.num_heads * hd)
            if cfg.qk_norm:
                shapes[f"{a}.q_norm.weight"] = (hd,)
                shapes[f"{a}.k_norm.weight"] = (hd,)
        ffn = _ffn(cfg, i)
        if not cfg.moe_layers[i]:
            mlp(ffn, cfg.dense_intermediate_size, ("gate_proj", "up_proj", "down_proj"))
            continue
        f, n = cfg.moe_intermediate_size, cfg.n_routed_experts
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        if cfg.fused_experts:  # Llama 4: a router, every expert in two tensors, one shared expert
            shapes[f"{ffn}.router.weight"] = (n, d)
            shapes[f"{ffn}.experts.gate_up_proj"] = (n, d, 2 * f)
            shapes[f"{ffn}.experts.down_proj"] = (n, f, d)
            mlp(f"{ffn}.shared_expert", shared, ("gate_proj", "up_proj", "down_proj"))
            continue
        shapes[f"{ffn}.gate.weight"] = (n, d)
        if cfg.scoring == "sigmoid":
            shapes[f"{ffn}.gate.e_score_correction_bias"] = (n,)
        for e in range(n):
            gate, up, down = routed_expert_names(cfg, i, e)
            shapes[gate], shapes[up], shapes[down] = (f, d), (f, d), (d, f)
        if cfg.n_shared_experts:
            mlp(f"{ffn}.shared_experts", shared, ("gate_proj", "up_proj", "down_proj"))
    return shapes


def read_weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single `model.safetensors`); every shard
    name stays inside `model_dir` (checkpoint_files.shard_path)."""
    return _weight_map(model_dir)[0]


def _weight_map(model_dir: Path) -> tuple[dict[str, str], dict[str, dict[str, TensorInfo]]]:
    """`read_weight_map`, and the headers it read on the way (by shard file: the single file's, if any)."""
    if (model_dir / INDEX_FILE).exists():
        return read_index(model_dir), {}
    single = model_dir / SINGLE_FILE
    if single.exists():
        shard_path(model_dir, SINGLE_FILE, tensor="<any>", listed_in=single)
        header = read_header(single)
        return dict.fromkeys(header.keys(), SINGLE_FILE), {SINGLE_FILE: header}
    raise WeightLoadError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} exists")


@dataclass
class LoadReport:
    """What one rank read: bytes by kind, which experts (in any layer, ascending), which files, how long."""

    ep_rank: int
    ep_size: int
    experts: tuple[int, ...]
    bytes_read: int = 0
    routed_expert_bytes: int = 0
    tensors_read: int = 0
    files: list[str] = field(default_factory=list)
    skipped_tensors: list[str] = field(default_factory=list)  # in the checkpoint, not used by the model
    seconds: float = 0.0

    @property
    def other_bytes(self) -> int:
        return self.bytes_read - self.routed_expert_bytes


@dataclass
class WeightPlan:
    """What a load will read, every header it needs already checked against config.json: by shard file
    (in reading order), each wanted name's bytes (a fused expert's piece: its own part). `read_planned`
    reads it and fills `report`."""

    root: Path
    files: dict[str, dict[str, TensorInfo]]
    report: LoadReport
    started: float  # time.perf_counter() when planning began: report.seconds counts from it

    @property
    def nbytes(self) -> int:
        """The bytes the read will take."""
        return sum(info.nbytes for spans in self.files.values() for info in spans.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor the read returns, by name, with its checked shape (the one config.json implies)."""
        return {name: info.shape for spans in self.files.values() for name, info in spans.items()}


class LoadProgress:
    """How far one rank's load has got: bytes read of the bytes it plans to read (0 of 0 until the plan is
    known). Written by the loading thread (`plan`, `advance`), read by any (`snapshot`, `as_json`); it
    logs progress as it goes (the module docstring says how often)."""

    def __init__(
        self,
        *,
        label: str = "rank 0",
        log_every_s: float = LOG_EVERY_S,
        log_every_fraction: float = LOG_EVERY_FRACTION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.log_every_s = log_every_s
        self.log_every_fraction = log_every_fraction
        self.clock = clock
        self._lock = threading.Lock()
        self._bytes = 0
        self._total = 0
        self._logged_at = 0.0
        self._logged_bytes = 0
        self._started = 0.0

    def plan(self, total: int) -> None:
        """The load will read `total` bytes (nothing read yet)."""
        with self._lock:
            self._bytes, self._total = 0, total
            self._started = self._logged_at = self.clock()
            self._logged_bytes = 0
        log.warning("kubemoe-runtime: %s: loading weights: %s to read", self.label, human_bytes(total))

    def advance(self, n: int) -> None:
        """`n` more bytes were read; logs when a tenth more of the total or LOG_EVERY_S have passed."""
        with self._lock:
            self._bytes = min(self._bytes + n, self._total)
            done, total, now = self._bytes, self._total, self.clock()
            step = max(1, int(total * self.log_every_fraction))
            due = (
                done == total
                or done - self._logged_bytes >= step
                or now - self._logged_at >= self.log_every_s
            )
            if due:
                self._logged_at, self._logged_bytes = now, done
            elapsed = now - self._started
        if due:
            log.warning(
                "kubemoe-runtime: %s: loading weights: %s of %s (%d%%) in %.1f s",
                self.label,
                human_bytes(done),
                human_bytes(total),
                100 * done // max(total, 1),
                elapsed,
            )

    def snapshot(self) -> tuple[int, int]:
        """(bytes read, bytes planned)."""
        with self._lock:
            return self._bytes, self._total

    def as_json(self) -> dict[str, int]:
        done, total = self.snapshot()
        return {"bytes": done, "bytesTotal": total}


def _expected_dtype(name: str, checkpoint_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    if name.endswith(_FP32_ALLOWED):
        return (checkpoint_dtype, torch.float32)
    return (checkpoint_dtype,)


def select_tensors(
    names: Iterable[str], *, experts: Container[int] | Mapping[int, Container[int]], n_experts: int
) -> list[str]:
    """The names this rank loads: everything but routed experts outside `experts` (the same experts in
    every layer, or each MoE layer's own, by layer index)."""
    selected = []
    for name in names:
        expert = routed_expert_id(name)
        if expert is not None and expert >= n_experts:
            raise WeightLoadError(f"tensor {name!r} names expert {expert} but config.json has {n_experts}")
        if expert is None:
            selected.append(name)
            continue
        held: Container[int] = experts
        if isinstance(experts, Mapping):
            layer = _LAYER_INDEX.match(name)
            held = experts.get(int(layer.group(1)), ()) if layer else ()
        if expert in held:
            selected.append(name)
    return selected


def load_rank_weights(
    model_dir: Path | str,
    *,
    cfg: ModelConfig,
    ep_rank: int = 0,
    ep_size: int = 1,
    into: Mapping[str, torch.Tensor] | None = None,
    slots: Mapping[int, Sequence[int]] | None = None,
    progress: LoadProgress | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read the tensors EP rank `ep_rank` of `ep_size` needs, validated against config.json.

    `slots` gives each MoE layer's slot experts (by layer index; default: `default_slots`); an expert
    in several slots is read once. Returns tensors in the checkpoint's dtype, keyed by their Hugging
    Face names, and a `LoadReport`. `into` maps names to destinations: a contiguous CPU tensor of the
    tensor's shape and stored dtype is read into and returned as itself; one that does not fit is ignored
    (that tensor is read as usual). `progress` learns the bytes to read once the headers are checked,
    then each read. The same as `read_planned(plan_rank_weights(...))`.
    """
    plan = plan_rank_weights(model_dir, cfg=cfg, ep_rank=ep_rank, ep_size=ep_size, slots=slots)
    return read_planned(plan, into=into, progress=progress)


def plan_rank_weights(
    model_dir: Path | str,
    *,
    cfg: ModelConfig,
    ep_rank: int = 0,
    ep_size: int = 1,
    slots: Mapping[int, Sequence[int]] | None = None,
) -> WeightPlan:
    """What `load_rank_weights` reads, without reading any data: the index, then each shard header this
    rank needs (each read once), every needed tensor checked (present, config.json's shape, the
    checkpoint's dtype; WeightLoadError naming the shard and the tensor otherwise)."""
    started = time.perf_counter()
    root = Path(model_dir)
    held = {
        layer: frozenset(experts)
        for layer, experts in (slots or default_slots(cfg, ep_rank=ep_rank, ep_size=ep_size)).items()
    }
    report = LoadReport(ep_rank=ep_rank, ep_size=ep_size, experts=tuple(sorted(set().union(*held.values()))))
    expected = checkpoint_shapes(cfg)
    weight_map, headers = _weight_map(root)
    for name in expected:
        if name not in weight_map:
            raise WeightLoadError(
                f"{root / INDEX_FILE}: tensor {name!r} is missing from the checkpoint index"
            )
    report.skipped_tensors = sorted(set(weight_map) - set(expected))
    wanted = select_tensors(loadable_names(expected), experts=held, n_experts=cfg.n_routed_experts)
    files = _check_headers(root, wanted, cfg=cfg, expected=expected, weight_map=weight_map, headers=headers)
    return WeightPlan(root=root, files=files, report=report, started=started)


def read_planned(
    plan: WeightPlan,
    *,
    into: Mapping[str, torch.Tensor] | None = None,
    progress: LoadProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read what `plan` lists (`into` and `progress` as `load_rank_weights` takes them): the tensors by
    name, and the plan's report, filled in (so read a plan once). LoadCancelled once `cancelled()`."""
    report = plan.report
    if progress is not None:
        progress.plan(plan.nbytes)
    tensors: dict[str, torch.Tensor] = {}
    for file_name, spans in plan.files.items():
        _stop_if(cancelled)
        tensors.update(
            _read_tensors(
                plan.root / file_name, list(spans.items()), into=into, progress=progress, cancelled=cancelled
            )
        )
        for name, info in spans.items():
            report.bytes_read += info.nbytes
            report.tensors_read += 1
            if routed_expert_id(name) is not None:
                report.routed_expert_bytes += info.nbytes
        report.files.append(file_name)
    report.seconds = time.perf_counter() - plan.started
    return tensors, report


def load_expert_tensors(
    model_dir: Path | str,
    *,
    cfg: ModelConfig,
    experts: Mapping[int, Iterable[int]],
    cancelled: Callable[[], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Only routed experts: for each MoE layer index in `experts`, those expert ids (gate, up and down),
    validated as `load_rank_weights` validates them; the index is read again (the checkpoint as it is now).
    LoadCancelled once `cancelled()` is true: checked before the headers, before each shard's data and
    between reads (a read blocked in the kernel, as on a stalled volume, is not interrupted)."""
    started = time.perf_counter()
    root = Path(model_dir)
    wanted = [
        name
        for layer, ids in sorted(experts.items())
        for expert in sorted(set(ids))
        for name in routed_expert_names(cfg, layer, expert)
    ]
    report = LoadReport(
        ep_rank=-1, ep_size=0, experts=tuple(sorted({e for ids in experts.values() for e in ids}))
    )
    if not wanted:
        return {}, report
    _stop_if(cancelled)
    expected = checkpoint_shapes(cfg)
    for name in wanted:
        if _stored(name) not in expected:
            raise WeightLoadError(f"{name!r} is not a routed expert tensor of this model")
    weight_map, headers = _weight_map(root)
    for name in wanted:
        if _stored(name) not in weight_map:
            raise WeightLoadError(
                f"{root / INDEX_FILE}: tensor {_stored(name)!r} is missing from the checkpoint index"
            )
    _stop_if(cancelled)
    files = _check_headers(root, wanted, cfg=cfg, expected=expected, weight_map=weight_map, headers=headers)
    return read_planned(
        WeightPlan(root=root, files=files, report=report, started=started), cancelled=cancelled
    )


def _check_headers(
    root: Path,
    wanted: list[str],
    *,
    cfg: ModelConfig,
    expected: Mapping[str, tuple[int, ...]],
    weight_map: Mapping[str, str],
    headers: Mapping[str, dict[str, TensorInfo]],
) -> dict[str, dict[str, TensorInfo]]:
    """Check every shard header `wanted` needs (each read once; `headers`: those already read, by file)
    before reading any data, so a bad shard fails fast and by name; by file (sorted), each wanted name's
    bytes (a fused expert tensor's piece: only its span)."""
    checkpoint_dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(checkpoint_dtype, torch.dtype):
        raise WeightLoadError(f"{root / 'config.json'}: unknown dtype {cfg.dtype!r}")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in wanted:
        by_file[weight_map[_stored(name)]].append(name)
    files: dict[str, dict[str, TensorInfo]] = {}
    for file_name, names in sorted(by_file.items()):
        path = root / file_name
        infos = headers[file_name] if file_name in headers else read_header(path, needed=_stored(names[0]))
        spans: dict[str, TensorInfo] = {}
        for name in names:
            stored = _stored(name)
            info = infos.get(stored)
            if info is None:
                raise WeightLoadError(f"{path}: tensor {stored!r} is missing (the index says it is here)")
            if info.shape != expected[stored]:
                raise WeightLoadError(
                    f"{path}: tensor {stored!r} has shape {list(info.shape)} but config.json implies "
                    f"{list(expected[stored])}"
                )
            dtype = SAFETENSORS_DTYPES.get(info.dtype)
            allowed = _expected_dtype(stored, checkpoint_dtype)
            if dtype not in allowed:
                raise WeightLoadError(
                    f"{path}: tensor {stored!r} has dtype {info.dtype} but config.json says {cfg.dtype}"
                )
            source = fused_source(name)
            spans[name] = info if source is None else _piece(info, source[1])
        files[file_name] = spans
    return files


def _piece(info: TensorInfo, index: int) -> TensorInfo:
    """Row `index` of a tensor (its first dimension): one contiguous span of its bytes."""
    rows = info.shape[0]
    size = info.nbytes // rows  # the header check made nbytes exactly rows x the rest
    begin = info.begin + index * size
    return TensorInfo(dtype=info.dtype, shape=info.shape[1:], begin=begin, end=begin + size)


def _fits(dest: torch.Tensor | None, info: TensorInfo) -> bool:
    return (
        dest is not None
        and dest.device.type == "cpu"
        and dest.is_contiguous()
        and dest.dtype == SAFETENSORS_DTYPES[info.dtype]
        and tuple(dest.shape) == info.shape
    )


def _read_tensors(
    path: Path,
    wanted: list[tuple[str, TensorInfo]],
    *,
    into: Mapping[str, torch.Tensor] | None = None,
    progress: LoadProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors from one shard, in file order: a tensor with a destination in `into` straight into
    it; each run of adjacent others into one buffer they are views of. Each readinto() counts in
    `progress`; LoadCancelled once `cancelled()`, checked before each readinto()."""
    into = into or {}
    runs: list[list[tuple[str, TensorInfo]]] = []  # a placed tensor is a run of its own
    placed = {name for name, info in wanted if _fits(into.get(name), info)}
    for item in sorted(wanted, key=lambda item: item[1].begin):
        joins = runs and runs[-1][-1][1].end == item[1].begin and runs[-1][-1][0] not in placed
        if joins and item[0] not in placed:
            runs[-1].append(item)
        else:
            runs.append([item])
    tensors: dict[str, torch.Tensor] = {}
    reading = runs[0][0][0] if runs else "<none>"  # the tensor an OSError is reported against
    try:
        with path.open("rb", buffering=0) as f:
            for run in runs:
                reading = run[0][0]
                begin, end = run[0][1].begin, run[-1][1].end
                if reading in placed:
                    buffer = into[reading].view(-1).view(torch.uint8)
                else:
                    buffer = torch.empty(end - begin, dtype=torch.uint8)
                view = buffer.numpy().data  # a memoryview of the tensor's bytes
                f.seek(begin)
                got = 0
                while got < len(view):
                    _stop_if(cancelled)
                    if not (n := f.readinto(view[got : got + READ_CHUNK])):
                        break
                    got += n
                    if progress is not None:
                        progress.advance(n)
                for name, info in run:
                    if info.end - begin > got:
                        raise WeightLoadError(f"{path}: truncated while reading tensor {name!r}")
                    if name in placed:
                        tensors[name] = into[name]
                    else:
                        tensors[name] = _typed(buffer[info.begin - begin : info.end - begin], info)
    except OSError as err:
        raise WeightLoadError(f"{path}: cannot read tensor {reading!r}: {err}") from err
    return tensors


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """Bytes as the tensor they hold (a view; a copy only when the bytes are not aligned to the dtype)."""
    dtype = SAFETENSORS_DTYPES[info.dtype]
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(info.shape)
