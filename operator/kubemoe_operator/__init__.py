"""kubemoe control plane: ModelDeployment API, planner, renderer, reconciler and CLI."""

__version__ = "0.1.0"
