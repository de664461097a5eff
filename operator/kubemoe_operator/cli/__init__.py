"""The user's commands: `kubemoe` (plan, validate, crd, up/down) and `kubectl moe`, and their tables."""
