"""Compile the engine's C kernels once per source version into a cache, with the system's C compiler.

A kernel is a C file next to this module built with its flags into `<cache>/<name>-<digest>.so`, where the
digest covers the source (with the files it includes from here) and the compiler flags, so an edited kernel
is rebuilt and an unchanged one never is. One source may make several kernels, one per instruction set
(moe_bf16.c: AVX512-BF16 and AVX2+FMA; moe_amx.c includes it and adds AMX tiles);
each is built for the instruction set its flags name, never -march=native, so that a library built on one
machine (an image's build stage) runs on every CPU that has that instruction set.
The cache is `$KUBEMOE_KERNEL_DIR`, else `$XDG_CACHE_HOME/kubemoe/kernels` (`~/.cache/...`). A build
writes a temporary file and renames it into place, so ranks building at once never load half a file.

Loading a library runs its code, so only a trusted one is used: the cache directory and the file must be
owned by this user or root and writable by no one else (a missing cache directory is made 0700). A
cache that fails this, or cannot be written, is skipped with a warning and the kernel is built in a
fresh private directory instead; every failure is a `KernelBuildError` (the engine then runs its torch
path), never an exception of another kind.

Standard library only: a container image's build stage runs this file as a script, without torch, to
put the built kernels into the image (`python build.py --out DIR`; then `KUBEMOE_KERNEL_DIR=DIR`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
LIBRARY_MODE: Final = 0o755  # readable by the image's user; writable only by its owner
SHARED_DIR_MODE: Final = 0o755  # `--out`: a directory an image ships to another user

log = logging.getLogger(__name__)

# name -> compiler flags; the source is SOURCES[name] (default: the name). -fopenmp links libgomp.so.1: in a
# process that imported torch (whose wheel ships libgomp.so.1) the loader reuses that library, so kernels
# and torch share one OpenMP thread pool.
KERNELS: Final[dict[str, tuple[str, ...]]] = {
    "moe_bf16": ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"),
    "moe_bf16_avx2": ("-O3", "-mavx2", "-mfma", "-fopenmp"),
    "moe_amx": (
        "-O3",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512bf16",
        "-mfma",
        "-mamx-tile",
        "-mamx-bf16",
        "-fopenmp",
    ),
}
SOURCES: Final[dict[str, str]] = {"moe_bf16_avx2": "moe_bf16"}


class KernelBuildError(RuntimeError):
    pass


class UntrustedCacheError(KernelBuildError):
    """A cache directory or library another user could have written."""


def cache_dir() -> Path:
    if explicit := os.environ.get("KUBEMOE_KERNEL_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubemoe" / "kernels"


def source_path(name: str) -> Path:
    return HERE / f"{SOURCES.get(name, name)}.c"


def sources(name: str) -> list[Path]:
    """The kernel's C file and the files it includes from this directory (`#include "x.c"`), recursively."""
    found = [source_path(name)]
    for path in found:
        for line in path.read_text().splitlines():
            if line.startswith('#include "') and (HERE / line.split('"')[1]) not in found:
                found.append(HERE / line.split('"')[1])
    return found


def library_path(name: str, directory: Path | None = None) -> Path:
    source = b"".join(path.read_bytes() for path in sources(name))
    digest = hashlib.sha256(source + "\0".join(KERNELS[name]).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"{name}-{digest}.so"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def untrusted_because(st: os.stat_result) -> str | None:
    """Why a file with this status may hold someone else's code; None if only we or root can write it."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not this user ({os.geteuid()}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.filemode(st.st_mode)})"
    return None


def trusted_dir(directory: Path) -> Path:
    """`directory`, made 0700 if missing, checked to be a directory only we or root can write."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedCacheError(f"kernel cache {directory} is not a directory")
    if why := untrusted_because(st):
        raise UntrustedCacheError(f"kernel cache {directory} is {why}")
    return directory


def cached(target: Path) -> bool:
    """Whether the cache holds a library at `target` that we may load (a regular file, not a link)."""
    try:
        st = target.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        log.warning("kernel cache: ignoring %s, not a regular file; rebuilding it", target)
        return False
    if why := untrusted_because(st):
        log.warning("kernel cache: ignoring %s, %s; rebuilding it", target, why)
        return False
    return True


def build(name: str, directory: Path | None = None) -> Path:
    """The kernel's shared library, compiled first if the cache lacks a trusted copy of this version;
    in a private temporary directory when the cache cannot be trusted or written."""
    try:
        target = library_path(name, directory)
        trusted_dir(target.parent)
        if cached(target):
            return target
        return _compile(name, target)
    except (UntrustedCacheError, OSError) as err:
        problem = err
    try:
        private = Path(tempfile.mkdtemp(prefix="kubemoe-kernels-"))  # 0700, ours
        log.warning("kernel cache not used (%s); building %s in %s", problem, name, private)
        return _compile(name, library_path(name, private))
    except OSError as err:
        raise KernelBuildError(f"cannot build the {name} kernel: {problem}; then: {err}") from err


def _compile(name: str, target: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise KernelBuildError(f"no C compiler to build the {name} kernel (set CC, or install gcc)")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cc, *KERNELS[name], "-shared", "-fPIC", "-o", tmp, str(source_path(name))]
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired as err:
            raise KernelBuildError(f"building the {name} kernel timed out: {' '.join(command)}") from err
        if done.returncode != 0:
            raise KernelBuildError(f"building the {name} kernel failed: {' '.join(command)}\n{done.stderr}")
        os.chmod(tmp, LIBRARY_MODE)  # whatever the umask: a group-writable library would not load
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the kubemoe engine's C kernels into a directory.")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the kernel cache)")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.out.chmod(SHARED_DIR_MODE)  # the image's user (not the builder) reads it
    for name in KERNELS:
        path = build(name, args.out)
        if args.out is not None and path.parent != args.out:
            raise SystemExit(f"could not build {name} into {args.out} (see the warning above)")
        print(path)


if __name__ == "__main__":
    main()
