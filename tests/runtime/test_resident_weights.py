"""After a load no weight is held twice: the memory the model's tensors keep alive is their own bytes.

The loader reads each tensor into memory of its own (load/tensor_reads.py), q, k and v straight into the
fused qkv_proj (load/weight_map.py `qkv_weights`), and packing frees the row-major weights it packs
(model/packing.py). Before that, tensors were views of one buffer per run of adjacent tensors: a kept norm
pinned the whole run, with the q, k and v the engine had fused into a new tensor (about 21 MB a layer of
Qwen3-30B-A3B, 1 GB a rank) and every weight packing had copied.

Measured on the tiny generated checkpoints (tests/runtime/conftest.py): the bytes of the distinct storages
reachable from the model's parameters, buffers and packed weights, against those tensors' own bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear
from kubemoe_runtime.engines.torch.model import packing
from kubemoe_runtime.engines.torch.model.packing import PackedLinear, can_pack, pack_model
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

SLACK_BYTES = 0  # every tensor the model keeps owns exactly its bytes


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the model holds: parameters, buffers, and tensors kept as plain attributes (packed)."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        found += [t for t in module._parameters.values() if t is not None]
        found += [t for t in module._buffers.values() if t is not None]
        found += [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
    return [t for t in found if t.device.type != "meta"]


def resident_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the distinct storages the model's tensors keep alive, bytes of those tensors themselves).
    A packed (oneDNN) tensor has no storage to look at: it counts its own bytes on both sides."""
    storages: dict[object, int] = {}
    own: dict[object, int] = {}
    for t in model_tensors(model):
        nbytes = t.numel() * t.element_size()
        if t.is_mkldnn:
            storages[id(t)] = own[id(t)] = nbytes
            continue
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        own[(t.data_ptr(), nbytes)] = nbytes
    return sum(storages.values()), sum(own.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["as-stored", "converted"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_loaded_model_keeps_only_its_own_bytes(
    checkpoints: dict[str, Path], arch: str, dtype: torch.dtype
) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=dtype, pack=False)
    resident, own = resident_bytes(engine.model)
    # before: 98304 bytes more for qwen3_moe in bf16 (three layers' q, k and v), 327680 for llama4_text
    assert resident <= own + SLACK_BYTES, f"{resident - own} bytes held beside the weights"
    fused = [name for name, _ in engine.model.named_parameters() if name.endswith("qkv_proj.weight")]
    assert bool(fused) == (arch in ("qwen3_moe", "mixtral", "llama4_text"))  # not MLA: q, k, v fused


@pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")), reason="this CPU's oneDNN does not do bf16"
)
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_packing_frees_the_weights_it_packs(
    checkpoints: dict[str, Path], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing forced where the kernels would win (as on an AVX-512 CPU without bf16 instructions): no
    tensor the model keeps holds the bytes of a row-major weight that was packed."""
    monkeypatch.setattr(packing, "beats_packing", lambda: False)
    packed: list[tuple[int, int]] = []  # where each packed weight's row-major bytes were
    real_pack = packing.pack

    def pack(weight: torch.Tensor) -> torch.Tensor:
        packed.append((weight.data_ptr(), weight.numel() * weight.element_size()))
        return real_pack(weight)

    monkeypatch.setattr(packing, "pack", pack)
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16)
    assert packed
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    kept = [
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        for t in model_tensors(engine.model)
        if not t.is_mkldnn
    ]
    assert [p for p, _ in packed if any(begin <= p < begin + n for begin, n in kept)] == []
    resident, own = resident_bytes(engine.model)
    assert resident <= own + SLACK_BYTES


def test_a_tied_weight_is_not_packed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear whose weight another module shares (a tied lm_head is the embedding) stays row-major, in a
    KernelLinear on that same tensor, where the others are packed."""
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU's oneDNN does not do bf16")
    monkeypatch.setattr(packing, "beats_packing", lambda: False)
    model = Tied()
    assert pack_model(model)
    assert isinstance(model.get_submodule("proj"), PackedLinear)
    lm_head = model.get_submodule("lm_head")
    assert isinstance(lm_head, KernelLinear)
    assert lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


class Tied(nn.Module):
    """An embedding, a linear, and an lm_head that shares the embedding's weight, in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32, dtype=torch.bfloat16)
        self.proj = nn.Linear(32, 32, bias=False, dtype=torch.bfloat16)
        self.lm_head = nn.Linear(32, 64, bias=False, dtype=torch.bfloat16)
        self.lm_head.weight = self.embed.weight
