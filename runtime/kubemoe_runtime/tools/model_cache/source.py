"""What to fetch: --source (hf://ORG/NAME[@REVISION], untrusted), and which of the repository's top-level
files an engine needs (the shards the safetensors index names, the config and tokenizer files)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Final

from kubemoe_runtime.pod.messages import human_bytes
from kubemoe_runtime.tools.model_cache.errors import FillError, UsageError

INDEX: Final = "model.safetensors.index.json"
MAX_INDEX_BYTES: Final = 64 << 20  # DeepSeek-V3's index: about 9 MB

# The Hub's repository names (huggingface_hub's validate_repo_id): word characters, `-` and `.`, at most
# 96, starting and ending with a letter, digit or `_`; no `--` or `..`.
_NAME: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_SOURCE: Final = re.compile(rf"hf://(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s]*))?")
# A branch, tag or commit: git's ref characters, a few path segments (refs/pr/1).
_REVISION: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")

_WEIGHTS: Final = ("*.safetensors",)
_TORCH_WEIGHTS: Final = ("*.bin", "*.pt", "*.pth")
_SUPPORT: Final = ("*.json", "*.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja", "*.py")


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


def check_index_size(size: int) -> None:
    """FillError when a safetensors index of `size` bytes (listed, or on disk) is over MAX_INDEX_BYTES."""
    if size > MAX_INDEX_BYTES:
        raise FillError(
            f"{INDEX} is larger than {human_bytes(MAX_INDEX_BYTES)} ({human_bytes(size)}): "
            f"not a checkpoint index: refused"
        )


def index_shards(index_path: Path) -> set[str]:
    """The shard names in a safetensors index (untrusted: bounded, checked shape)."""
    check_index_size(index_path.stat().st_size)
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
