"""The operator process (`python -m kubemoe_operator`): its settings, health endpoints and own metrics."""
