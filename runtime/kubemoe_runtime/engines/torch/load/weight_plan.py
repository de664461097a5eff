"""The records of one rank's load: what it will read (`WeightPlan`: every span, its header already checked,
by shard file) and what it read (`LoadReport`). rank_weights.py makes and reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kubemoe_runtime.engines.torch.load.checkpoint_files import TensorInfo


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
