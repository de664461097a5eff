"""Inference engines: `torch` (built in, expert-parallel over torch.distributed) and `vllm` (supervised)."""
