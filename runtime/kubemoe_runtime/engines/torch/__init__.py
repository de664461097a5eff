"""The built-in torch engine: readable single-device modules plus expert parallelism (see parallel.py)."""

from kubemoe_runtime.engines.torch.model.engine import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel, init_expert_parallel

__all__ = ["ExpertParallel", "TorchEngine", "init_expert_parallel"]
