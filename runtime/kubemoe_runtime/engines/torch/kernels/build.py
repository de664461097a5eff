"""Compile the engine's C kernels once per source version into a cache, with the system's C compiler.

A kernel is one C file next to this module, built into `<cache>/<name>-<digest>.so`, where the digest
covers the source and the compiler flags, so an edited kernel is rebuilt and an unchanged one never is.
The cache is `$KUBEMOE_KERNEL_DIR`, else `$XDG_CACHE_HOME/kubemoe/kernels` (`~/.cache/...`). A build
writes a temporary file and renames it into place, so ranks building at once never load half a file.

Standard library only: a container image's build stage runs this file as a script, without torch, to
put the built kernels into the image (`python build.py --out DIR`; then `KUBEMOE_KERNEL_DIR=DIR`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent

# name -> compiler flags. -fopenmp links libgomp.so.1: in a process that imported torch (whose wheel
# ships libgomp.so.1) the loader reuses that library, so kernels and torch share one OpenMP thread pool.
KERNELS: Final[dict[str, tuple[str, ...]]] = {
    "moe_bf16": ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"),
}


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    if explicit := os.environ.get("KUBEMOE_KERNEL_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubemoe" / "kernels"


def library_path(name: str, directory: Path | None = None) -> Path:
    source = (HERE / f"{name}.c").read_bytes()
    digest = hashlib.sha256(source + "\0".join(KERNELS[name]).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"{name}-{digest}.so"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(name: str, directory: Path | None = None) -> Path:
    """The kernel's shared library, compiled first if the cache lacks this version of it."""
    target = library_path(name, directory)
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        raise KernelBuildError(f"no C compiler to build the {name} kernel (set CC, or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cc, *KERNELS[name], "-shared", "-fPIC", "-o", tmp, str(HERE / f"{name}.c")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise KernelBuildError(f"building the {name} kernel failed: {' '.join(command)}\n{done.stderr}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the kubemoe engine's C kernels into a directory.")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the kernel cache)")
    args = parser.parse_args()
    for name in KERNELS:
        print(build(name, args.out))


if __name__ == "__main__":
    main()
