"""Autoscaling prefill and decode separately: metric sources, and the pure decision."""
