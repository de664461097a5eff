"""Checkpoints as untrusted input: hostile safetensors headers and index files fail by name, never read
outside a tensor's own bytes, and never raise anything but WeightLoadError."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemoe_runtime.engines.torch.load.checkpoint_files import INDEX_FILE, WeightLoadError
from kubemoe_runtime.engines.torch.load.checkpoint_tensors import checkpoint_shapes
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import expert_range, load_rank_weights, read_weight_map

F32_2x3 = {"dtype": "F32", "shape": [2, 3]}  # 24 bytes


def safetensors_bytes(header: Any, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    claimed = len(raw) if header_len is None else header_len
    return struct.pack("<Q", claimed) + raw + data


def single_file(tmp_path: Path, content: bytes) -> Path:
    """A folder holding only `model.safetensors` (read_weight_map then checks its whole header)."""
    folder = tmp_path / "single"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(content)
    return folder


def two_tensors(x_span: int) -> dict[str, Any]:
    return {
        "x": {**F32_2x3, "data_offsets": [0, x_span]},
        "y": {**F32_2x3, "data_offsets": [x_span, x_span + 24]},
    }


# -- headers ---------------------------------------------------------------------------------------


def test_a_valid_header_loads(tmp_path: Path) -> None:
    folder = single_file(tmp_path, safetensors_bytes(two_tensors(24), bytes(48)))
    assert read_weight_map(folder) == {"x": "model.safetensors", "y": "model.safetensors"}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        pytest.param(
            two_tensors(12),
            bytes(36),
            r"tensor 'x' spans 12 bytes but F32 \[2, 3\] needs 24",
            id="short-span",
        ),
        pytest.param(
            two_tensors(28), bytes(52), r"tensor 'x' spans 28 bytes but F32 \[2, 3\] needs 24", id="long-span"
        ),
        pytest.param(
            {"x": {**F32_2x3, "data_offsets": [24, 0]}},
            bytes(24),
            r"'x'.*0 <= begin <= end",
            id="begin-after-end",
        ),
        pytest.param(
            {"x": {**F32_2x3, "data_offsets": [-24, 0]}},
            bytes(24),
            r"'x'.*0 <= begin <= end",
            id="negative-offset",
        ),
        pytest.param(
            {"x": {**F32_2x3, "data_offsets": [0, 24]}, "y": {**F32_2x3, "data_offsets": [12, 36]}},
            bytes(36),
            r"tensor 'y' overlaps tensor 'x'",
            id="overlap",
        ),
        pytest.param(
            {"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}},
            bytes(2),
            r"'x'.*unknown dtype 'Q7'",
            id="unknown-dtype",
        ),
        pytest.param(
            {"x": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}},
            bytes(24),
            r"'x'.*not a list of non-negative integers",
            id="negative-shape",
        ),
        pytest.param(
            {"x": {"dtype": "F32", "shape": ["2", 3.0], "data_offsets": [0, 24]}},
            bytes(24),
            r"'x'.*not a list of non-negative integers",
            id="non-integer-shape",
        ),
        pytest.param(
            {"x": {"dtype": "F32", "shape": [2**62, 2**62, 2**62], "data_offsets": [0, 24]}},
            bytes(24),
            r"'x' spans 24 bytes but .* needs more than the file holds",
            id="huge-shape",
        ),
        pytest.param(
            {"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}},
            bytes(1),
            r"'x' spans 1 bytes but F4 \[3\] needs 1.5",
            id="packed-dtype-not-whole-bytes",
        ),
        pytest.param(
            {"x": {**F32_2x3, "data_offsets": [0, 48]}},
            bytes(24),
            r"truncated: tensor 'x' needs bytes up to",
            id="past-the-end",
        ),
        pytest.param(
            {"x": {**F32_2x3, "data_offsets": [0]}},
            bytes(24),
            r"'x'.*data_offsets \[0\] is not \[begin, end\]",
            id="one-offset",
        ),
        pytest.param({"x": 5}, b"", r"'x'.*not an object", id="entry-not-an-object"),
        pytest.param([1, 2], b"", r"corrupt header \(a JSON list, not an object\)", id="header-a-list"),
        pytest.param(b"\xff\xfe\x00garbage", b"", r"corrupt header", id="not-json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, b"", r"corrupt header", id="deeply-nested"),
        pytest.param({"__metadata__": [1]}, b"", r"__metadata__ is not an object", id="metadata-a-list"),
    ],
)
def test_a_hostile_header_fails_naming_file_and_tensor(
    tmp_path: Path, header: Any, data: bytes, message: str
) -> None:
    folder = single_file(tmp_path, safetensors_bytes(header, data))
    with pytest.raises(WeightLoadError, match=rf"model\.safetensors: .*{message}"):
        read_weight_map(folder)


@pytest.mark.parametrize("claimed", [2**63, 2**64 - 1, 100_000_001])
def test_a_huge_header_length_is_refused_before_reading(tmp_path: Path, claimed: int) -> None:
    folder = single_file(tmp_path, safetensors_bytes({}, header_len=claimed))
    with pytest.raises(WeightLoadError, match=rf"claims {claimed} bytes, over the 100000000-byte limit"):
        read_weight_map(folder)


def test_a_header_longer_than_the_file_is_truncated(tmp_path: Path) -> None:
    folder = single_file(tmp_path, safetensors_bytes({}, header_len=1000))
    with pytest.raises(WeightLoadError, match=r"truncated inside its header"):
        read_weight_map(folder)


# -- a real checkpoint with one bad span ----------------------------------------------------------

EXPERT = "model.layers.1.mlp.experts.5.down_proj.weight"


@pytest.fixture
def ckpt(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    return dst


def _index(ckpt: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((ckpt / INDEX_FILE).read_text())
    return index


def _write_index(ckpt: Path, index: dict[str, Any]) -> None:
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def _shorten_span(shard: Path, tensor: str) -> None:
    """Halve `tensor`'s data_offsets span (header length and every other offset kept)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin, end = header[tensor]["data_offsets"]
    header[tensor]["data_offsets"] = [begin, begin + (end - begin) // 2]
    raw = json.dumps(header, separators=(",", ":")).encode()
    shard.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :])


def test_a_short_span_is_refused_even_when_reading_into_place(ckpt: Path) -> None:
    """Read straight into an engine stack, a short span would fill the rest from the next tensor."""
    import torch

    from kubemoe_runtime.engines.torch.load.weight_map import expert_stacks

    shard = ckpt / _index(ckpt)["weight_map"][EXPERT]
    _shorten_span(shard, EXPERT)
    cfg = ModelConfig.load(ckpt)
    experts = expert_range(n_experts=cfg.n_routed_experts, ep_rank=0, ep_size=1)
    _, places = expert_stacks(checkpoint_shapes(cfg), experts=experts, dtype=getattr(torch, cfg.dtype))
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: tensor '{EXPERT}' spans \d+ bytes but BF16"):
        load_rank_weights(ckpt, cfg=cfg, into=places)
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: tensor '{EXPERT}' spans"):
        load_rank_weights(ckpt, cfg=cfg)


# -- shard names in the index ----------------------------------------------------------------------


def _move_shard_out(ckpt: Path, tmp_path: Path) -> tuple[str, Path]:
    """Move the shard holding EXPERT out of the folder (a valid shard, so only the path is wrong)."""
    name = str(_index(ckpt)["weight_map"][EXPERT])
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(ckpt / name, outside)
    return name, outside


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_shard_outside_the_folder_is_refused(ckpt: Path, tmp_path: Path, how: str) -> None:
    name, outside = _move_shard_out(ckpt, tmp_path)
    index = _index(ckpt)
    if how == "symlink":
        (ckpt / name).symlink_to(outside)
    else:
        target = f"../elsewhere/{name}" if how == "dotdot" else str(outside)
        index["weight_map"] = {t: target if f == name else f for t, f in index["weight_map"].items()}
        _write_index(ckpt, index)
    with pytest.raises(WeightLoadError, match=rf"{INDEX_FILE}: tensor '.+' is in .*outside the checkpoint"):
        load_rank_weights(ckpt, cfg=ModelConfig.load(ckpt))


def test_etc_passwd_is_refused_by_name(ckpt: Path) -> None:
    index = _index(ckpt)
    index["weight_map"]["model.norm.weight"] = "../../../../../../../../etc/passwd"
    _write_index(ckpt, index)
    with pytest.raises(WeightLoadError, match=r"'model\.norm\.weight' is in '\.\./.*etc/passwd', outside"):
        read_weight_map(ckpt)


def test_a_symlinked_single_file_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(safetensors_bytes(two_tensors(24), bytes(48)))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(WeightLoadError, match=r"outside the checkpoint folder"):
        read_weight_map(folder)


def test_links_inside_the_folder_and_a_hub_cache_snapshot_load(ckpt: Path, tmp_path: Path) -> None:
    """Hugging Face's cache keeps `snapshots/REV/FILE -> ../../blobs/SHA`: that layout must load."""
    cfg = ModelConfig.load(ckpt)
    want, _ = load_rank_weights(ckpt, cfg=cfg)
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(ckpt.iterdir())):
        shutil.copy(file, blobs / f"sha{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"sha{i}")
    got, _ = load_rank_weights(snapshot, cfg=cfg)
    assert got.keys() == want.keys()
    inside = ckpt / "sub"
    inside.mkdir()
    name = str(_index(ckpt)["weight_map"][EXPERT])
    shutil.move(ckpt / name, inside / name)
    (ckpt / name).symlink_to(Path("sub") / name)
    got, _ = load_rank_weights(ckpt, cfg=cfg)
    assert got.keys() == want.keys()


@pytest.mark.parametrize(
    "index",
    [[1, 2], {"weight_map": [1]}, {"weight_map": {"model.norm.weight": 5}}, {"metadata": {}}],
    ids=["a-list", "weight-map-a-list", "shard-not-a-string", "no-weight-map"],
)
def test_a_malformed_index_is_refused(ckpt: Path, index: Any) -> None:
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=rf"{INDEX_FILE}: not a valid safetensors index"):
        read_weight_map(ckpt)


@pytest.mark.parametrize("how", ["dev-zero", "outside", "fifo", "directory"])
def test_an_index_that_is_not_a_file_inside_the_folder_is_refused(
    ckpt: Path, tmp_path: Path, how: str
) -> None:
    """The index is read as the shards are: never through a link out of the folder (/dev/zero's size
    reads 0, so no size check before reading catches it), never from a FIFO or a device."""
    index = ckpt / INDEX_FILE
    outside = tmp_path / "outside-index.json"
    shutil.move(index, outside)
    if how == "dev-zero":
        index.symlink_to("/dev/zero")
        problem = "a link to /dev/zero, outside the checkpoint folder"
    elif how == "outside":
        index.symlink_to(outside)
        problem = f"a link to {outside}, outside the checkpoint folder"
    elif how == "fifo":
        os.mkfifo(index)
        problem = "not a regular file"
    else:
        index.mkdir()
        problem = "not a regular file"
    with pytest.raises(WeightLoadError, match=rf"^{index}: {problem}"):
        read_weight_map(ckpt)


def _fails_promptly(call: Callable[[], object], fifo: Path, *, within_s: float = 10.0) -> BaseException:
    """The exception `call()` raises, on a thread; fails the test if it is still running after `within_s`
    (blocked opening `fifo` for reading: a writer that opens and closes it then lets it go on)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the test
            raised.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within_s)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the reader that waits
        thread.join(within_s)
        pytest.fail(f"still waiting on the FIFO {fifo} after {within_s} s")
    assert raised, "it loaded"
    return raised[0]


@pytest.mark.parametrize("how", ["fifo", "directory", "single-fifo"])
def test_a_shard_that_is_not_a_regular_file_is_refused_promptly(ckpt: Path, tmp_path: Path, how: str) -> None:
    """A FIFO listed as a shard is refused as the index is (read_header opens shards as
    read_checkpoint_file does): opening it for reading would wait for a writer, so the load hung."""
    if how == "single-fifo":
        folder = tmp_path / "single"
        folder.mkdir()
        shard = folder / "model.safetensors"
        os.mkfifo(shard)
        err = _fails_promptly(lambda: read_weight_map(folder), shard)
    else:
        shard = ckpt / str(_index(ckpt)["weight_map"][EXPERT])
        shard.unlink()
        if how == "fifo":
            os.mkfifo(shard)
        else:
            shard.mkdir()
        err = _fails_promptly(lambda: load_rank_weights(ckpt, cfg=ModelConfig.load(ckpt)), shard)
    assert isinstance(err, WeightLoadError)
    assert re.match(rf"^{re.escape(str(shard))}: not a regular file; needed for tensor '.+'$", str(err))


def test_an_index_linked_inside_the_folder_loads(ckpt: Path) -> None:
    want = read_weight_map(ckpt)
    (ckpt / "sub").mkdir()
    shutil.move(ckpt / INDEX_FILE, ckpt / "sub" / INDEX_FILE)
    (ckpt / INDEX_FILE).symlink_to(Path("sub") / INDEX_FILE)
    assert read_weight_map(ckpt) == want


def test_an_index_over_the_limit_is_refused_by_the_bytes_read(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubemoe_runtime.engines.torch.load import checkpoint_files

    monkeypatch.setattr(checkpoint_files, "MAX_INDEX_BYTES", 10_000)
    index = _index(ckpt)
    (ckpt / INDEX_FILE).write_text(json.dumps(index) + " " * 10_000)
    with pytest.raises(WeightLoadError, match=rf"{INDEX_FILE}: over the 10000-byte limit"):
        read_weight_map(ckpt)


# -- any bytes -------------------------------------------------------------------------------------

DTYPES = st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F4", "F6_E2M3", "BOOL", "Q7", ""])
INTS = st.integers(min_value=-(2**65), max_value=2**65) | st.integers(min_value=-4, max_value=64)
ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "dtype": DTYPES | st.integers(),
        "shape": st.lists(INTS, max_size=4) | st.text(max_size=3),
        "data_offsets": st.lists(INTS, min_size=0, max_size=3),
    },
)
HEADERS = st.dictionaries(st.text(max_size=6), ENTRIES | st.integers() | st.none(), max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=256))
def test_any_bytes_load_or_fail_with_weight_load_error(tmp_path: Path, content: bytes) -> None:
    folder = single_file(tmp_path, content)
    with contextlib.suppress(WeightLoadError):
        read_weight_map(folder)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=HEADERS, data=st.binary(max_size=96), pad=st.integers(0, 8), cut=st.integers(0, 16))
def test_any_header_is_refused_or_every_span_is_its_own(
    tmp_path: Path, header: dict[str, Any], data: bytes, pad: int, cut: int
) -> None:
    """Whatever a header says, a header that passes gives each tensor exactly dtype x shape bytes,
    inside the file, overlapping no other tensor; one that does not fails with WeightLoadError."""
    from kubemoe_runtime.engines.torch.load.checkpoint_files import DTYPE_BITS, read_header

    content = safetensors_bytes(json.dumps(header).encode() + b" " * pad, data)
    content = content[: max(0, len(content) - cut)]
    path = single_file(tmp_path, content) / "model.safetensors"
    try:
        infos = read_header(path)
    except WeightLoadError:
        return
    size = os.path.getsize(path)
    data_start = 8 + struct.unpack("<Q", content[:8])[0]
    spans = []
    for info in infos.values():
        numel = 1
        for n in info.shape:
            numel *= n
        assert data_start <= info.begin <= info.end <= size
        assert 8 * info.nbytes == numel * DTYPE_BITS[info.dtype]
        if info.nbytes:
            spans.append((info.begin, info.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


# -- config.json against the checkpoint -------------------------------------------------------------

SHARD = r"model-\d+-of-\d+\.safetensors"
EXPERT_TENSOR = r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"


def _edit_config(ckpt: Path, **fields: Any) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"moe_intermediate_size": 2**20},
            rf"{SHARD}: tensor '{EXPERT_TENSOR}' has shape \[(32, 64|64, 32)\] but config\.json implies "
            r"\[(1048576, 64|64, 1048576)\]",
            id="moe-intermediate-size",
        ),
        pytest.param(
            {"hidden_size": 2**14},
            rf"{SHARD}: tensor 'model\.embed_tokens\.weight' has shape \[512, 64\] but config\.json implies "
            r"\[512, 16384\]",
            id="hidden-size",
        ),
        pytest.param(
            {"num_experts": 64, "num_local_experts": 64},
            rf"{INDEX_FILE}: tensor '{EXPERT_TENSOR}' is missing from the checkpoint index",
            id="expert-count",
        ),
    ],
)
def test_a_config_that_disagrees_with_its_checkpoint_fails_before_any_stack_is_allocated(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], message: str
) -> None:
    """The engine's expert stacks are sized only once every header it needs matches config.json: a config
    that disagrees fails by shard, tensor and both shapes, never with an allocator error."""
    import torch

    from kubemoe_runtime.engines.torch.model import engine

    _edit_config(ckpt, **fields)
    allocated: list[object] = []

    def expert_stacks(*args: object, **kwargs: object) -> tuple[dict[str, Any], dict[str, Any]]:
        allocated.append(args)
        return {}, {}

    monkeypatch.setattr(engine, "expert_stacks", expert_stacks)
    with pytest.raises(WeightLoadError, match=message):
        engine.TorchEngine.load(ckpt, dtype=torch.bfloat16, pack=False)
    assert allocated == []


_LOAD_UNDER_AN_ADDRESS_LIMIT = """
import json, resource, sys, torch
from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load.checkpoint_files import WeightLoadError

torch.set_num_threads(1)
def vm_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
# 1 GiB of address space to spare: well over a tiny model's load, well under config.json's 6 GiB of stacks.
limit = (vm_kb() << 10) + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    TorchEngine.load(sys.argv[1], dtype=torch.bfloat16, pack=False)
    error = None
except Exception as err:
    error = f"{type(err).__name__}: {err}"
grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "grew_kb": grew_kb}))
"""


def test_a_config_with_a_huge_expert_size_fails_by_name_in_little_memory(ckpt: Path) -> None:
    """moe_intermediate_size 2**20 against a checkpoint of 32: sizing the stacks from config.json first
    would ask for 6 GiB (an allocator error under this address-space limit); the header check refuses
    it first, and the process's peak RSS barely moves."""
    import subprocess
    import sys

    _edit_config(ckpt, moe_intermediate_size=2**20)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_AN_ADDRESS_LIMIT, str(ckpt)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"] is not None
    assert result["error"].startswith("WeightLoadError: "), result["error"]
    assert re.search(r"has shape \[(32, 64|64, 32)\] but config\.json implies", result["error"])
    assert result["grew_kb"] < 64 << 10  # KiB: the load's own small reads, no stack of config.json's size


def test_the_plan_checks_every_header_once_and_reads_nothing(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan_rank_weights reads each needed shard's header once (a single-file checkpoint's too: the
    header read for its names is reused) and no data; read_planned then loads what load_rank_weights does."""
    import torch
    from safetensors.torch import load_file, save_file

    from kubemoe_runtime.engines.torch.load import rank_weights as weights
    from kubemoe_runtime.engines.torch.load.checkpoint_files import TensorInfo, read_header

    single = tmp_path / "single-file"
    single.mkdir()
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        merged.update(load_file(shard))
    save_file(merged, single / "model.safetensors")
    shutil.copy(ckpt / "config.json", single / "config.json")

    headers: list[Path] = []

    def counting(path: Path, *, needed: str = "<any>") -> dict[str, TensorInfo]:
        headers.append(path)
        return read_header(path, needed=needed)

    for folder in (ckpt, single):
        cfg = ModelConfig.load(folder)
        want, want_report = load_rank_weights(folder, cfg=cfg, ep_rank=1, ep_size=2)
        headers.clear()
        monkeypatch.setattr(weights, "read_header", counting)
        plan = weights.plan_rank_weights(folder, cfg=cfg, ep_rank=1, ep_size=2)
        assert sorted(headers) == sorted({folder / name for name in plan.files})
        assert plan.report.bytes_read == 0
        assert plan.nbytes == want_report.bytes_read
        experts = expert_range(n_experts=cfg.n_routed_experts, ep_rank=1, ep_size=2)
        held = [e for name in plan.shapes() if (e := weights.routed_expert_id(name)) is not None]
        assert held
        assert set(held) == set(experts)
        got, report = weights.read_planned(plan)
        monkeypatch.undo()
        assert len(headers) == len(plan.files)  # reading took no further header
        assert got.keys() == want.keys() == plan.shapes().keys()
        assert all(tuple(got[name].shape) == shape for name, shape in plan.shapes().items())
        assert all(torch.equal(got[name], want[name]) for name in want)
        assert (report.bytes_read, report.files) == (want_report.bytes_read, want_report.files)
