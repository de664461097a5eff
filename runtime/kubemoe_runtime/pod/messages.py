"""How the runtime words things for people: an error as one line, a byte count in a log line."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's lines joined; its type's name when it has no message."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    return text or type(err).__name__


def human_bytes(n: int) -> str:
    """`123 B`, `4.5 KiB`, `67.8 MiB`, `1.2 GiB` (binary units, one decimal)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
