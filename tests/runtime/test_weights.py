from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.load.checkpoint_files import WeightLoadError
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import expert_range, load_rank_weights, routed_expert_id


def test_expert_range_is_contiguous_and_covers_every_expert() -> None:
    assert [expert_range(n_experts=8, ep_rank=r, ep_size=2) for r in range(2)] == [range(0, 4), range(4, 8)]
    uneven = [expert_range(n_experts=10, ep_rank=r, ep_size=4) for r in range(4)]
    assert [len(r) for r in uneven] == [3, 3, 2, 2]
    assert [e for r in uneven for e in r] == list(range(10))
    with pytest.raises(ValueError, match="exceeds"):
        expert_range(n_experts=2, ep_rank=0, ep_size=4)


def test_routed_expert_id_ignores_shared_experts() -> None:
    assert routed_expert_id("model.layers.3.mlp.experts.17.up_proj.weight") == 17
    assert routed_expert_id("model.layers.3.block_sparse_moe.experts.2.w1.weight") == 2
    assert routed_expert_id("model.layers.3.mlp.shared_experts.up_proj.weight") is None
    assert routed_expert_id("model.layers.3.mlp.gate.weight") is None


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2", "llama4_text"])
def test_each_ep_rank_reads_half_the_routed_expert_bytes(checkpoints: dict[str, Path], arch: str) -> None:
    ckpt = checkpoints[arch]
    cfg = ModelConfig.load(ckpt)
    full, report1 = load_rank_weights(ckpt, cfg=cfg)
    halves = [load_rank_weights(ckpt, cfg=cfg, ep_rank=r, ep_size=2) for r in range(2)]
    assert report1.routed_expert_bytes > 0
    for tensors, report in halves:
        assert report.routed_expert_bytes * 2 == report1.routed_expert_bytes
        assert report.other_bytes == report1.other_bytes  # dense, attention, router, shared: everyone
        assert set(tensors) < set(full)
    assert set(halves[0][0]) | set(halves[1][0]) == set(full)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert report1.bytes_read == index["metadata"]["total_size"]


@pytest.fixture
def broken(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    return dst


def _shard_of(ckpt: Path, tensor: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / str(index["weight_map"][tensor])


EXPERT = "model.layers.1.mlp.experts.5.down_proj.weight"


def test_missing_shard_names_file_and_tensor(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    shard.unlink()
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: shard file is missing.*tensor '"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_missing_shard_of_experts_this_rank_does_not_own_is_not_read(broken: Path) -> None:
    """A shard holding only another rank's experts is never opened."""
    cfg = ModelConfig.load(broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    files = {f for n, f in index["weight_map"].items() if (routed_expert_id(n) or 0) >= 4}
    needed_by_rank0 = {f for n, f in index["weight_map"].items() if (routed_expert_id(n) or 0) < 4}
    only_rank1 = files - needed_by_rank0
    for f in only_rank1:
        (broken / f).unlink()
    _, report = load_rank_weights(broken, cfg=cfg, ep_rank=0, ep_size=2)
    assert not set(report.files) & only_rank1


def test_truncated_shard_names_file_and_tensor(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: truncated: tensor '.+' needs bytes up to"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_corrupt_header_names_file(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: corrupt header"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def _rewrite_header(shard: Path, tensor: str, **changes: object) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if changes.get("drop"):
        del header[tensor]
    else:
        header[tensor].update(changes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))  # keep the data offsets valid
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n :])


def test_wrong_dtype_names_file_and_tensor(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    _rewrite_header(shard, EXPERT, dtype="F16")
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: tensor '{EXPERT}' has dtype F16 but"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_wrong_shape_names_file_and_tensor(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    _rewrite_header(shard, EXPERT, shape=[32, 64])
    with pytest.raises(WeightLoadError, match=rf"tensor '{EXPERT}' has shape \[32, 64\] but config"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_tensor_missing_from_shard_names_file_and_tensor(broken: Path) -> None:
    shard = _shard_of(broken, EXPERT)
    _rewrite_header(shard, EXPERT, drop=True)
    with pytest.raises(WeightLoadError, match=rf"{shard.name}: tensor '{EXPERT}' is missing"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_tensor_missing_from_index_names_tensor(broken: Path) -> None:
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=r"'model\.norm\.weight' is missing from the checkpoint index"):
        load_rank_weights(broken, cfg=ModelConfig.load(broken))


def test_shard_gone_between_header_check_and_read_names_file_and_tensor(tmp_path: Path) -> None:
    # The headers pass first; a shard removed before its data is read must still fail by name.
    from kubemoe_runtime.engines.torch.load.checkpoint_files import TensorInfo
    from kubemoe_runtime.engines.torch.load.tensor_reads import read_tensors as _read_tensors

    gone = tmp_path / "model-00001-of-00002.safetensors"
    with pytest.raises(WeightLoadError, match=r"model-00001-of-00002\.safetensors.*'a\.weight'"):
        _read_tensors(gone, [("a.weight", TensorInfo(dtype="BF16", shape=(2,), begin=8, end=12))])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2"])
def test_experts_are_read_straight_into_the_engine_stacks(checkpoints: dict[str, Path], arch: str) -> None:
    """`into`: the loader fills the stacked expert parameters itself, and stacking then copies nothing."""
    import torch

    from kubemoe_runtime.engines.torch.load.checkpoint_tensors import checkpoint_shapes
    from kubemoe_runtime.engines.torch.load.weight_map import expert_stacks, to_engine_state_dict

    ckpt = checkpoints[arch]
    cfg = ModelConfig.load(ckpt)
    dtype, experts = (
        getattr(torch, cfg.dtype),
        expert_range(n_experts=cfg.n_routed_experts, ep_rank=1, ep_size=2),
    )
    plain, _ = load_rank_weights(ckpt, cfg=cfg, ep_rank=1, ep_size=2)
    stacks, places = expert_stacks(checkpoint_shapes(cfg), experts=experts, dtype=dtype)
    assert places
    assert all(routed_expert_id(name) in experts for name in places)

    placed, _ = load_rank_weights(ckpt, cfg=cfg, ep_rank=1, ep_size=2, into=places)

    assert placed.keys() == plain.keys()
    for name, tensor in placed.items():
        assert torch.equal(tensor, plain[name]), name
        if name in places:
            assert tensor is places[name]
    want = to_engine_state_dict(plain, cfg=cfg, experts=experts, dtype=dtype)
    got = to_engine_state_dict(placed, cfg=cfg, experts=experts, dtype=dtype, stacks=stacks)
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        assert torch.equal(tensor, want[key]), key
        if key in stacks:
            assert tensor is stacks[key], f"{key} was copied again"


def test_a_destination_that_does_not_fit_is_ignored(checkpoints: dict[str, Path]) -> None:
    import torch

    ckpt = checkpoints["qwen3_moe"]
    cfg = ModelConfig.load(ckpt)
    plain, _ = load_rank_weights(ckpt, cfg=cfg)
    name = next(n for n in plain if routed_expert_id(n) == 0 and "gate_proj" in n)
    wrong_shape = torch.zeros(plain[name].numel(), dtype=plain[name].dtype)
    wrong_dtype = torch.zeros(plain[name].shape, dtype=torch.float64)
    for dest in (wrong_shape, wrong_dtype):
        got, _ = load_rank_weights(ckpt, cfg=cfg, into={name: dest})
        assert got[name] is not dest
        assert torch.equal(got[name], plain[name])
        assert dest.abs().sum() == 0, "a misfit destination was written"
