"""A free TCP port on 127.0.0.1: for single-pod groups' store, vLLM's child, `kubemoe up`, tests and bench."""

from __future__ import annotations

import socket


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it; it may be taken again before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
