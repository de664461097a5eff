"""The marker, `.kubemoe-cache.json` in DIR: written last, it says which source DIR holds complete, so a
rerun for the same source exits at once without reaching the Hub."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from kubemoe_runtime.tools.model_cache.source import CacheFile, safe_name

MARKER: Final = ".kubemoe-cache.json"


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
