"""Filling DIR: the Hub's listing of the commit (an index over its cap refused there), the index (one
refused is removed), the space check, then one file at a time through huggingface_hub (each file's size
checked against the listing), the marker last. The caller holds DIR's lock (lock.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubemoe_runtime.pod.messages import human_bytes
from kubemoe_runtime.tools.model_cache.errors import FillError
from kubemoe_runtime.tools.model_cache.hub import endpoint
from kubemoe_runtime.tools.model_cache.marker import MARKER, Marker, read_marker, write_marker
from kubemoe_runtime.tools.model_cache.progress import Progress, say, ticking
from kubemoe_runtime.tools.model_cache.source import (
    INDEX,
    CacheFile,
    Source,
    check_index_size,
    index_shards,
    safe_name,
    select_files,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

PROGRESS_EVERY_S: Final = 5.0
MAX_FILES: Final = 10_000  # a model repository's top level holds tens to hundreds


@dataclass
class Outcome:
    marker: Marker
    fetched_bytes: int  # downloaded by this run (the rest was there)
    seconds: float
    already: bool = False

    def summary(self) -> str:
        doc = {
            "phase": "done",
            "source": self.marker.source,
            "revision": self.marker.revision,
            "files": len(self.marker.files),
            "bytes": self.marker.bytes,
            "fetchedBytes": self.fetched_bytes,
            "seconds": round(self.seconds, 1),
            "alreadyComplete": self.already,
        }
        return json.dumps(doc, separators=(",", ":"))


def fill(source: Source, directory: Path, progress: Progress, *, alone: bool = True) -> Outcome:
    """Fill `directory` from `source` (see the package docstring); FillError or the library's errors.
    `alone`: this process holds DIR's lock (lock.py), so no other fill has a download in flight there."""
    started = time.monotonic()
    from huggingface_hub import HfApi
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()  # no terminal bars in a pod's log: our own lines say how far it got
    api = HfApi(endpoint=endpoint())  # HF_TOKEN: the library reads it
    progress.set(phase="listing", message=f"listing {source}")
    say(f"listing {source} on {endpoint()}")
    info = api.model_info(source.repo_id, revision=source.revision)
    commit = info.sha or source.revision or "main"
    listing = _top_level(api, source.repo_id, commit)
    if INDEX in listing:
        check_index_size(listing[INDEX])  # before a byte of it lands on the volume

    previous = read_marker(directory)
    with contextlib.suppress(FileNotFoundError):
        (directory / MARKER).unlink()  # not complete until this run ends
    if alone:
        _drop_partial_downloads(directory)
    shards, fetched = None, 0
    if INDEX in listing:  # first: it says which shards to fetch
        fetched = _download(source, commit, CacheFile(INDEX, listing[INDEX]), directory, progress=None)
        try:
            shards = index_shards(directory / INDEX)
        except FillError:
            (directory / INDEX).unlink(missing_ok=True)  # refused: not left to fill the volume
            raise
    files = select_files(listing, index_shards=shards)
    total = sum(f.size for f in files)
    if previous is not None and previous.source != str(source):
        _prune(directory, stale={f.path for f in previous.files} - {f.path for f in files})
    _check_space(directory, files, total)

    progress.set(phase="downloading", files_total=len(files), bytes_total=total, message="")
    say(f"{len(files)} files, {human_bytes(total)} from {source} at {commit} into {directory}")
    with ticking(progress, PROGRESS_EVERY_S):
        for f in files:
            progress.start_file(f)
            fetched += _download(source, commit, f, directory, progress=progress)
            progress.finish_file(f)
            say(f"{progress.line()}: {f.path} ({human_bytes(f.size)})")
    marker = Marker(source=str(source), revision=commit, files=files, bytes=total)
    write_marker(directory, marker)
    done = f"done: {len(files)} files, {human_bytes(total)} in {directory}"
    progress.set(phase="done", message=done)
    say(done)
    return Outcome(marker=marker, fetched_bytes=fetched, seconds=time.monotonic() - started)


def _top_level(api: HfApi, repo_id: str, commit: str) -> dict[str, int]:
    from huggingface_hub.hf_api import RepoFile

    listing: dict[str, int] = {}
    for entry in api.list_repo_tree(repo_id, revision=commit, recursive=False):
        if isinstance(entry, RepoFile):
            listing[entry.path] = int(entry.size)
            if len(listing) > MAX_FILES:
                raise FillError(f"the repository lists more than {MAX_FILES} files: not a model repository")
    return listing


def _drop_partial_downloads(directory: Path) -> None:
    """The partial files an interrupted run left in huggingface_hub's download folder (it never reuses them:
    each download writes a file of its own name). Only while holding DIR's lock: another fill's partial
    files are its downloads in flight."""
    for stale in (directory / ".cache" / "huggingface" / "download").glob("**/*.incomplete"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _prune(directory: Path, *, stale: set[str]) -> None:
    """Files the previous source's marker listed that this source has not: another model's shards."""
    for name in sorted(stale):
        if safe_name(name):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
                say(f"removed {name} (of the source this folder held before)")


def _check_space(directory: Path, files: list[CacheFile], total: int) -> None:
    needed = sum(f.size - _size_on_disk(directory / f.path, f.size) for f in files)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FillError(
            f"{directory}: not enough space: the model needs {human_bytes(needed)} more, "
            f"{human_bytes(free)} is free: give the volume at least {human_bytes(total)} (plus headroom)"
        )


def _size_on_disk(path: Path, size: int) -> int:
    """`size` if the file is there complete, else 0."""
    try:
        return size if path.stat().st_size == size else 0
    except OSError:
        return 0


def _download(
    source: Source, commit: str, f: CacheFile, directory: Path, *, progress: Progress | None
) -> int:
    """One file into DIR at the commit; the bytes fetched (0 when it was there). The size must be the
    listed one: otherwise the file is removed and FillError raised."""
    from huggingface_hub import hf_hub_download

    path = directory / f.path
    if path.resolve().parent != directory.resolve():  # safe_name keeps it there; a symlink might not
        raise FillError(f"{f.path!r} would be written outside {directory}: refused")
    try:
        if path.is_file() and path.stat().st_size != f.size:
            path.unlink()  # cut short or changed since: the library would keep it, as its commit matches
        before = path.stat().st_mtime_ns if path.is_file() else None
    except OSError:
        before = None
    bar = _bar_class(progress.arrived) if progress is not None else None
    hf_hub_download(
        source.repo_id, f.path, revision=commit, local_dir=directory, endpoint=endpoint(), tqdm_class=bar
    )
    got = path.stat().st_size
    if got != f.size:
        path.unlink(missing_ok=True)
        raise SizeMismatch(
            f"{f.path}: downloaded {got} bytes but the Hub lists {f.size}: the transfer was cut short or the "
            f"repository changed meanwhile: run again (complete files are kept)"
        )
    return 0 if before is not None and path.stat().st_mtime_ns == before else f.size


class SizeMismatch(FillError):
    pass


def _bar_class(arrived: Callable[[int], None]) -> type[Any]:
    """A huggingface_hub progress bar class (its tqdm) that also hands the byte count to `arrived`."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.counted = 0
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self.counted = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self.counted += int(n or 0)
            arrived(self.counted)
            result: bool | None = super().update(n)
            return result

    return Bar
