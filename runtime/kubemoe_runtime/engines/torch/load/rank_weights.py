"""What one expert-parallel rank loads of a sharded safetensors checkpoint: which tensors, checked, then read.

A Hugging Face checkpoint is a set of shards plus `model.safetensors.index.json` (tensor name -> shard).
An expert-parallel (EP) rank needs every dense, attention, norm, router and shared-expert tensor, but only
the routed experts of its slots. By default ownership is contiguous: with E experts over N ranks, rank r
owns `expert_range(n_experts=E, ep_rank=r, ep_size=N)` (the first E % N ranks own one extra when N does
not divide E), the same split vLLM uses. A placement (model/placement.py) gives each MoE layer its own
list of slot experts instead (`slots`); an expert a rank holds in two slots is read once (the caller
copies it into each slot). `load_expert_tensors` reads just some layers' routed experts: what a rank
newly holds when the placement changes while it serves; its caller may cancel it (`cancelled`, checked
before each shard and between reads: `LoadCancelled`, tensor_reads.py). A fused expert tensor (Llama 4)
is chosen from and read as one piece per expert (checkpoint_tensors.py), its whole header entry checked.

`load_rank_weights` plans from the index and the config, checks each shard's header (present, not
truncated, every needed tensor present with the shape config.json implies and the checkpoint's dtype)
before reading a byte of data, then reads only the selected tensors and reports the bytes it read. Its two
halves are callable apart: `plan_rank_weights` (the index and every header this rank needs, each shard's
header read once, all checked: a `WeightPlan`) and `read_planned` (the data, read by tensor_reads.py). The
engine sizes the buffers it reads experts into from a plan's checked shapes, so a config.json that
disagrees with its checkpoint fails by name before anything is allocated from its sizes.
The checkpoint is untrusted input: `checkpoint_files` keeps shard names inside the folder and checks
every header entry (bounded header, spans in the file, dtype x shape bytes, no overlaps), so a read
never leaves a tensor's own bytes. Every failure is a `WeightLoadError` naming the shard file and the
tensor.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
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
from kubemoe_runtime.engines.torch.load.checkpoint_tensors import (
    checkpoint_shapes,
    fused_source,
    loadable_names,
    routed_expert_names,
    stored_name,
)
from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.tensor_reads import (
    SAFETENSORS_DTYPES,
    read_tensors,
    stop_if_cancelled,
)
from kubemoe_runtime.engines.torch.load.weight_plan import LoadReport, WeightPlan

SINGLE_FILE: Final = "model.safetensors"

_ROUTED_EXPERT: Final = re.compile(r"\.experts\.(\d+)\.")
_LAYER_INDEX: Final = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")

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


def default_slots(cfg: ModelConfig, *, ep_rank: int, ep_size: int) -> dict[int, range]:
    """Each MoE layer's slot experts under the contiguous default: this rank's `expert_range`."""
    experts = expert_range(n_experts=cfg.n_routed_experts, ep_rank=ep_rank, ep_size=ep_size)
    return {layer: experts for layer, moe in enumerate(cfg.moe_layers) if moe}


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
        stop_if_cancelled(cancelled)
        tensors.update(
            read_tensors(
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
    into: Mapping[str, torch.Tensor] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Only routed experts: for each MoE layer index in `experts`, those expert ids (gate, up and down),
    validated as `load_rank_weights` validates them; the index is read again (the checkpoint as it is now).
    `into` as `load_rank_weights` takes it. LoadCancelled once `cancelled()` is true: checked before the
    headers, before each shard's data and between reads (a read blocked in the kernel, as on a stalled
    volume, is not interrupted)."""
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
    stop_if_cancelled(cancelled)
    expected = checkpoint_shapes(cfg)
    for name in wanted:
        if stored_name(name) not in expected:
            raise WeightLoadError(f"{name!r} is not a routed expert tensor of this model")
    weight_map, headers = _weight_map(root)
    for name in wanted:
        if stored_name(name) not in weight_map:
            raise WeightLoadError(
                f"{root / INDEX_FILE}: tensor {stored_name(name)!r} is missing from the checkpoint index"
            )
    stop_if_cancelled(cancelled)
    files = _check_headers(root, wanted, cfg=cfg, expected=expected, weight_map=weight_map, headers=headers)
    return read_planned(
        WeightPlan(root=root, files=files, report=report, started=started), into=into, cancelled=cancelled
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
        by_file[weight_map[stored_name(name)]].append(name)
    files: dict[str, dict[str, TensorInfo]] = {}
    for file_name, names in sorted(by_file.items()):
        path = root / file_name
        infos = (
            headers[file_name] if file_name in headers else read_header(path, needed=stored_name(names[0]))
        )
        spans: dict[str, TensorInfo] = {}
        for name in names:
            stored = stored_name(name)
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
