"""kubemoe data plane: sharded MoE weights, torch and vLLM engines, OpenAI API, router, metrics."""

__version__ = "0.1.0"
