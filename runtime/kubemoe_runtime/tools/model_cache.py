"""`kubemoe-runtime fill-cache`: fill a model cache folder once from the Hugging Face Hub, with progress.

    kubemoe-runtime fill-cache --source hf://ORG/NAME[@REVISION] --dir DIR [--port 8080] [--linger S]

The operator runs it in a Job that fills a volume before the serving groups start (#20); the groups then
load DIR as a local model path, as any engine can: DIR is a plain folder of the repository's top-level
files that an engine needs:

    *.safetensors   the weights: with `model.safetensors.index.json`, exactly the shards it names (a repo
                    that also ships another layout, e.g. Mistral's consolidated.safetensors, is not fetched
                    twice); without safetensors, the PyTorch weights (*.bin, *.pt, *.pth) instead
    *.json          config.json, generation_config.json, the index, tokenizer.json, tokenizer_config.json ...
    tokenizer files *.model, *.tiktoken, vocab.txt, merges.txt, *.jinja (chat templates), and *.py (the
                    code of a model that needs --trust-remote-code; inert otherwise)

Never hidden files (.gitattributes), subfolders (a repo's original/ or metal/ copies), *.gguf, *.onnx,
README, images. Files are fetched one at a time, in the listing's order, smallest first.

State, all in DIR:
    .kubemoe-cache.json   written last: {source, revision (the commit), files: [{path, size}], bytes}.
                          When it names this --source and every file it lists is there with its size, the
                          command exits 0 at once without reaching the Hub.
    .cache/huggingface/   huggingface_hub's record of each file's commit and etag: an interrupted fill
                          resumes (a complete file of the same commit is kept, not fetched again).

Progress: one line per file on stderr and at least every PROGRESS_EVERY_S while downloading (files done of
total, bytes done of total), and `GET /progress` on --port (all addresses) for the whole run:
    {"phase": "listing"|"downloading"|"done"|"failed", "files", "filesTotal", "bytes", "bytesTotal",
     "message"}
--linger S keeps /progress up S seconds after the end, so a poller sees "done" or "failed".

Outcome: exit 0 and a one-line JSON summary on stdout; or ONE line on stderr naming the problem and the
fix (`kubemoe-runtime fill-cache: error: ...`), never a traceback (KUBEMOE_DEBUG=1 adds it), exit 1 (2
for a bad --source). Either line is also written to the termination log (Kubernetes'
terminationMessagePath, /dev/termination-log; KUBEMOE_TERMINATION_LOG names another) when that file
exists and is writable, so the operator can show it without reading logs.

Why huggingface_hub (the library transformers and vLLM download with, already in both runtime images):
it speaks the Hub as it is (HF_ENDPOINT, HF_TOKEN, redirects to the CDN, Xet storage through hf_xet,
retries with resume inside a file, the errors that tell a gated repo from a missing one), which a
hand-written client would have to chase. We use its public calls only: `HfApi.model_info` (the commit a
revision names), `HfApi.list_repo_tree` (file names with sizes, top level), and `hf_hub_download(...,
local_dir=DIR)` per file, counting bytes through its `tqdm_class` hook. `snapshot_download` is not used:
it downloads in parallel threads with no per-file hook, and cannot select the shards an index names.

The source and the listing are untrusted: --source must be hf://ORG/NAME[@REVISION] with the Hub's
characters; a listed name is used only if it is a plain file name (no separators, no `..`, not hidden), so
every path stays inside DIR; an index that names a shard the listing lacks is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Literal

from kubemoe_runtime.pod.messages import human_bytes, one_line

if TYPE_CHECKING:
    from huggingface_hub import HfApi

PROG: Final = "kubemoe-runtime fill-cache"
MARKER: Final = ".kubemoe-cache.json"
INDEX: Final = "model.safetensors.index.json"
TERMINATION_LOG: Final = "/dev/termination-log"
TERMINATION_LOG_ENV: Final = "KUBEMOE_TERMINATION_LOG"
DEBUG_ENV: Final = "KUBEMOE_DEBUG"
DEFAULT_ENDPOINT: Final = "https://huggingface.co"
PROGRESS_EVERY_S: Final = 5.0
MAX_FILES: Final = 10_000  # a model repository's top level holds tens to hundreds
MAX_INDEX_BYTES: Final = 64 << 20  # DeepSeek-V3's index: about 9 MB
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

# The Hub's repository names (huggingface_hub's validate_repo_id): word characters, `-` and `.`, at most
# 96, starting and ending with a letter, digit or `_`; no `--` or `..`.
_NAME: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_SOURCE: Final = re.compile(rf"hf://(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s]*))?")
# A branch, tag or commit: git's ref characters, a few path segments (refs/pr/1).
_REVISION: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")

_WEIGHTS: Final = ("*.safetensors",)
_TORCH_WEIGHTS: Final = ("*.bin", "*.pt", "*.pth")
_SUPPORT: Final = ("*.json", "*.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja", "*.py")

Phase = Literal["listing", "downloading", "done", "failed"]


class FillError(Exception):
    """A failure with its one-line explanation (what went wrong and what to do)."""


class UsageError(FillError):
    """A bad --source or --dir: exit 2."""


@dataclass(frozen=True)
class Source:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_source(text: str) -> Source:
    """hf://ORG/NAME[@REVISION], checked as untrusted input; UsageError otherwise."""
    shown = text if len(text) <= 200 else f"{text[:200]}..."
    fix = "give hf://ORG/NAME or hf://ORG/NAME@REVISION (a branch, tag or commit)"
    match = _SOURCE.fullmatch(text)
    if match is None:
        raise UsageError(f"--source {shown!r} is not a Hugging Face model: {fix}")
    repo, revision = match["repo"], match["revision"]
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        raise UsageError(f"--source {shown!r}: the Hub allows no '--', '..' or '.git' ending: {fix}")
    if revision is not None and (
        len(revision) > 255 or ".." in revision or not _REVISION.fullmatch(revision)
    ):
        raise UsageError(f"--source {shown!r}: {revision!r} is not a branch, tag or commit: {fix}")
    return Source(repo_id=repo, revision=revision)


# --- what to fetch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheFile:
    path: str
    size: int


def safe_name(path: str) -> bool:
    """A listed name that is a plain, visible file name at DIR's top level (so it stays inside DIR)."""
    return (
        0 < len(path) <= 255
        and "/" not in path
        and "\\" not in path
        and not path.startswith(".")
        and path.isprintable()
    )


def select_files(listing: dict[str, int], *, index_shards: Iterable[str] | None = None) -> list[CacheFile]:
    """The files an engine needs from a repository's top-level listing (name -> size), smallest first.
    `index_shards`: the shards `model.safetensors.index.json` names, when the listing has one."""
    names = [name for name in listing if safe_name(name)]

    def matching(patterns: Sequence[str]) -> list[str]:
        return [name for name in names if any(fnmatch(name, p) for p in patterns)]

    weights = matching(_WEIGHTS)
    if index_shards is not None:
        shards = set(index_shards)
        missing = sorted(shards - set(names))
        if missing:
            raise FillError(
                f"{INDEX} names {len(missing)} shard(s) the repository does not hold at its top level "
                f"(first: {missing[0][:200]!r}): not a checkpoint an engine can load"
            )
        weights = [name for name in weights if name in shards]
    elif not weights:
        weights = matching(_TORCH_WEIGHTS)
    if not weights:
        raise FillError(
            "the repository holds no weights at its top level (*.safetensors, or *.bin/*.pt): "
            "not a model an engine can load"
        )
    chosen = set(weights) | set(matching(_SUPPORT))
    return sorted((CacheFile(name, listing[name]) for name in chosen), key=lambda f: (f.size, f.path))


def index_shards(index_path: Path) -> set[str]:
    """The shard names in a safetensors index (untrusted: bounded, checked shape)."""
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise FillError(f"{INDEX} is larger than {human_bytes(MAX_INDEX_BYTES)}: not a checkpoint index")
    try:
        doc = json.loads(index_path.read_bytes())
        weight_map = doc["weight_map"]
        shards = set(weight_map.values())
        if not all(isinstance(s, str) for s in shards):
            raise TypeError("a shard name is not a string")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise FillError(
            f"{INDEX} is not a safetensors index ({err}): not a checkpoint an engine can load"
        ) from err
    unsafe = sorted(s for s in shards if not safe_name(s))
    if unsafe:
        raise FillError(f"{INDEX} names a shard outside the folder ({unsafe[0][:200]!r}): refused")
    return shards


# --- the marker ------------------------------------------------------------------------------------------


@dataclass
class Marker:
    source: str
    revision: str
    files: list[CacheFile]
    bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "revision": self.revision,
            "files": [asdict(f) for f in self.files],
            "bytes": self.bytes,
        }


def read_marker(directory: Path) -> Marker | None:
    """DIR's marker, or None when absent or unreadable (then the cache is not complete)."""
    try:
        doc = json.loads((directory / MARKER).read_bytes())
        files = [CacheFile(path=str(f["path"]), size=int(f["size"])) for f in doc["files"]]
        return Marker(
            source=str(doc["source"]), revision=str(doc["revision"]), files=files, bytes=int(doc["bytes"])
        )
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None


def complete(directory: Path, marker: Marker) -> bool:
    """Every file the marker lists is in DIR with its size."""
    for f in marker.files:
        if not safe_name(f.path):
            return False
        try:
            if (directory / f.path).stat().st_size != f.size:
                return False
        except OSError:
            return False
    return True


def write_marker(directory: Path, marker: Marker) -> None:
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker.as_json(), indent=1) + "\n")
    tmp.replace(directory / MARKER)


# --- progress --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """The run's progress, written by the filling thread, read by the HTTP server and the ticker."""

    phase: Phase = "listing"
    files: int = 0
    files_total: int = 0
    bytes: int = 0
    bytes_total: int = 0
    message: str = ""
    current: str = ""
    current_bytes: int = 0  # of `current`, counted as it arrives (at most its size; never backwards)
    current_size: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "phase": self.phase,
                "files": self.files,
                "filesTotal": self.files_total,
                "bytes": self.bytes + self.current_bytes,
                "bytesTotal": self.bytes_total,
                "message": self.message,
            }

    def set(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def start_file(self, f: CacheFile) -> None:
        self.set(current=f.path, current_bytes=0, current_size=f.size, message=f"downloading {f.path}")

    def arrived(self, counted: int) -> None:
        """`counted` bytes of the current file so far (by the download's own count)."""
        with self.lock:
            self.current_bytes = max(self.current_bytes, min(counted, self.current_size))

    def finish_file(self, f: CacheFile) -> None:
        with self.lock:
            self.files += 1
            self.bytes += f.size
            self.current, self.current_bytes, self.current_size = "", 0, 0

    def line(self) -> str:
        doc = self.as_json()
        percent = 100 * doc["bytes"] // max(doc["bytesTotal"], 1)
        return (
            f"{doc['files']}/{doc['filesTotal']} files, {human_bytes(doc['bytes'])} of "
            f"{human_bytes(doc['bytesTotal'])} ({percent}%)"
        )


def say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


class ProgressServer(ThreadingHTTPServer):
    """GET /progress: the run's Progress as JSON; anything else 404."""

    daemon_threads = True

    def __init__(self, port: int, progress: Progress) -> None:
        self.progress = progress
        super().__init__(("0.0.0.0", port), _ProgressHandler)  # all addresses: the operator polls the pod IP

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="progress-http", daemon=True).start()


class _ProgressHandler(BaseHTTPRequestHandler):
    server: ProgressServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/progress":
            self._send(404, {"error": "not found: GET /progress"})
            return
        self._send(200, self.server.progress.as_json())

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # polled every few seconds: no line per request


@contextlib.contextmanager
def ticking(progress: Progress, every_s: float) -> Iterator[None]:
    """A progress line every `every_s` while downloading."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every_s):
            with progress.lock:
                downloading, current = progress.phase == "downloading", progress.current
            if downloading:
                say(f"{progress.line()}" + (f", downloading {current}" if current else ""))

    thread = threading.Thread(target=tick, name="progress-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


# --- filling ---------------------------------------------------------------------------------------------


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


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


def fill(source: Source, directory: Path, progress: Progress) -> Outcome:
    """Fill `directory` from `source` (see the module docstring); FillError or the library's errors."""
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

    previous = read_marker(directory)
    with contextlib.suppress(FileNotFoundError):
        (directory / MARKER).unlink()  # not complete until this run ends
    _drop_partial_downloads(directory)
    shards, fetched = None, 0
    if INDEX in listing:  # first: it says which shards to fetch
        fetched = _download(source, commit, CacheFile(INDEX, listing[INDEX]), directory, progress=None)
        shards = index_shards(directory / INDEX)
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
    each download writes a file of its own name)."""
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


# --- errors ----------------------------------------------------------------------------------------------


def explain(err: BaseException, source: Source | None, directory: Path) -> str:
    """One line: what went wrong and what to do."""
    if isinstance(err, FillError):
        return str(err) if isinstance(err, UsageError) else f"{source}: {err}"
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    where = f"{source} on {endpoint()}"
    if isinstance(err, GatedRepoError):
        return (
            f"{where} is gated ({_status(err)}; {token}): accept its terms on the model's Hub page with "
            f"the account of a token, and give that token as HF_TOKEN (credentialsSecret)"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{where}: no such revision ({_status(err)}): give a branch, tag or commit the repository has"
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{where}: no such model repository ({_status(err)}; {token}): check ORG/NAME; a private "
            f"model needs HF_TOKEN with a token that can read it"
        )
    if isinstance(err, RemoteEntryNotFoundError):
        return f"{where}: a listed file is gone ({_status(err)}): the repository changed meanwhile: run again"
    if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) == 401:
        return f"{where}: the Hub refused the token ({_status(err)}; {token}): set HF_TOKEN to a valid token"
    if (transport := _transport_error(err)) is not None:
        return (
            f"cannot reach the Hub at {endpoint()} ({type(transport).__name__}: {one_line(transport)}): "
            f"check the pod's network (egress, proxy) or HF_ENDPOINT; run again (the fill resumes)"
        )
    if isinstance(err, HfHubHTTPError):
        return (
            f"{where}: the Hub answered {_status(err)}: {one_line(err)[:300]}; run again later "
            f"(the fill resumes)"
        )
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{directory}: the volume is full ({err.strerror}): give it more space than the model's size "
            f"(the progress says bytesTotal); run again (the fill resumes)"
        )
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{one_line(err)}: {directory} must be writable by this process (uid {os.getuid()}): "
            f"check the volume's permissions (fsGroup) or mount"
        )
    return f"{source}: {type(err).__name__}: {one_line(err)}"


def _status(err: BaseException) -> str:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else type(err).__name__


def _transport_error(err: BaseException) -> BaseException | None:
    """The connection error (refused, timed out, DNS, TLS) somewhere in `err`'s causes, if any."""
    import httpx2

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx2.TransportError | ConnectionError | TimeoutError):
            return current
        current = current.__cause__ or current.__context__
    return None


def write_termination_log(line: str) -> None:
    """Kubernetes' terminationMessagePath, when there is one to write (the kubelet mounts it)."""
    path = os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG
    if os.path.isfile(path) and os.access(path, os.W_OK):
        with contextlib.suppress(OSError), open(path, "w") as log:
            log.write(line + "\n")


class Interrupted(Exception):
    """SIGTERM (the Job deleted): stop; the next run resumes."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("stopped by SIGTERM: the next run resumes")


# --- the command -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", required=True, help="hf://ORG/NAME[@REVISION]")
    parser.add_argument("--dir", required=True, type=Path, help="the cache folder (created if absent)")
    parser.add_argument("--port", type=int, default=8080, help="GET /progress here (0: any free port)")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds /progress stays up after the end")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: give 0..65535")
    if not 0 <= args.linger <= 3600:
        parser.error(f"--linger {args.linger}: give 0..3600 seconds")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    directory: Path = args.dir
    progress = Progress()
    source: Source | None = None
    server: ProgressServer | None = None
    try:
        source = parse_source(args.source)
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"--dir {directory}: not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        marker = read_marker(directory)
        if marker is not None and marker.source == str(source) and complete(directory, marker):
            outcome = Outcome(marker=marker, fetched_bytes=0, seconds=0.0, already=True)
            say(
                f"the cache is complete: {directory} holds {source} at {marker.revision} "
                f"({len(marker.files)} files, {human_bytes(marker.bytes)})"
            )
            return _succeed(outcome)
        try:
            server = ProgressServer(args.port, progress)
        except OSError as err:
            raise UsageError(
                f"--port {args.port}: cannot listen ({err.strerror}): give another --port"
            ) from err
        server.start()
        say(f"progress: GET http://0.0.0.0:{server.server_address[1]}/progress")
        signal.signal(signal.SIGTERM, _on_sigterm)
        outcome = fill(source, directory, progress)
        return _succeed(outcome)
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(err)
        if isinstance(err, KeyboardInterrupt):
            line = "interrupted: the next run resumes"
        elif isinstance(err, Interrupted):
            line = str(err)
        else:
            line = explain(err, source, directory)
        progress.set(phase="failed", message=line)
        say(f"error: {line}")
        write_termination_log(f"{PROG}: error: {line}")
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if server is not None:
            if args.linger:
                with contextlib.suppress(Interrupted, KeyboardInterrupt):
                    time.sleep(args.linger)
            server.shutdown()


def _succeed(outcome: Outcome) -> int:
    summary = outcome.summary()
    with contextlib.suppress(OSError):
        print(summary, flush=True)
    write_termination_log(summary)
    return 0
