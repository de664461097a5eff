"""A checkpoint read that blocks, as one from a stalled network volume does (test_placement_timeout.py).

`stall(path)` makes each later open of the shard `path` wait, in the kernel, on a FIFO beside it
(`<path>.stall`) that nobody writes; `release` ends such a wait, and that open then fails as a volume
that gave up does (EIO). The hook (`install`) wraps checkpoint_files.open_regular_file, in this process
or, through the sitecustomize `server_env` writes, in a server's processes (its rank processes too: they
inherit the environment). A FIFO in the shard's own place would not do: a shard that is not a regular
file is refused at once, never waited on.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from kubemoe_runtime.engines.torch.load import checkpoint_files

REPO = Path(__file__).resolve().parents[2]
_real_open = checkpoint_files.open_regular_file


def _stall_fifo(path: Path | str) -> str:
    return f"{path}.stall"


def open_or_stall(path: Path) -> int:
    fifo = _stall_fifo(path)
    if os.path.exists(fifo):
        os.close(os.open(fifo, os.O_RDONLY))  # waits for a writer: `release`
        raise OSError(errno.EIO, "the stalled volume gave up", str(path))
    return _real_open(path)


def install() -> None:
    """Put the hook in this process (read_header and read_tensors open shards through it)."""
    checkpoint_files.open_regular_file = open_or_stall


def stall(path: Path) -> None:
    os.mkfifo(_stall_fifo(path))


def release(paths: list[Path], *, timeout: float = 10.0) -> None:
    """End the open blocked on one of these stalled shards (it then fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in paths:
            try:  # ENXIO while nobody has the FIFO open to read
                fd = os.open(_stall_fifo(path), os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                continue
            os.close(fd)
            return
        time.sleep(0.01)
    raise AssertionError(f"no loader blocked on {[p.name for p in paths]}")


def server_env(folder: Path) -> dict[str, str]:
    """The environment that installs the hook in a server's processes: a sitecustomize in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import tests.runtime.stall_hook\ntests.runtime.stall_hook.install()\n"
    )
    paths = [str(folder), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths)}
