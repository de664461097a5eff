"""kubemoe's own images, built from its Dockerfiles as they are, for a real node's containerd.

`ensure_images()` builds operator/Dockerfile and runtime/Dockerfile.cpu with Debian's buildah, FROM
a base built here (images_base: no public registry is reachable) and with torch from pip's default
index (`TORCH_INDEX=`), and writes each as an OCI archive that `ctr -n k8s.io images import` takes.
Each image is keyed by a sha256 of its build inputs (the Dockerfile, the files its COPY lines
take from the context, the build arguments, the base's own input hash): a call with nothing changed
builds nothing. buildah's layer cache (`--layers`) keeps unchanged steps, so a runtime code change
does not download torch again. Archives live in ~/.cache/kubemoe/images, one per image (older ones
are removed, and so are older images of ours and dangling layers in buildah's storage).

    python -m e2e.cluster.images [--only operator]   # builds; prints ref, size, build time
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dockerfile_parse import DockerfileParser

from e2e.cluster import images_base, images_buildah
from e2e.cluster.images_buildah import ImageBuildError, log

__all__ = ["SPECS", "Image", "ImageBuildError", "Spec", "ensure_images"]

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "1"  # bump when the way images are built changes, to rebuild them all
# Never part of a build context (a checkout's leftovers, not sources). COPY takes the rest.
IGNORED = ("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".mypy_cache", ".pytest_cache", ".ruff_cache")
# Staged files get one fixed mtime, so buildah's COPY cache sees only their contents and modes.
MTIME = 946684800  # 2000-01-01


@dataclass(frozen=True)
class Spec:
    name: str
    repo: str
    dockerfile: Path
    context: Path
    args: tuple[tuple[str, str], ...] = ()  # build arguments besides BASE_IMAGE


@dataclass(frozen=True)
class Image:
    ref: str  # e.g. kubemoe.local/kubemoe-operator:<first 12 hex digits of the input hash>
    archive: Path  # an uncompressed OCI archive (tar) naming `ref`, for `ctr images import`
    size_bytes: int  # the archive's size: about the unpacked image's
    build_seconds: float  # what building it (and writing the archive) took, when it was built


SPECS = {
    s.name: s
    for s in (
        Spec("operator", "kubemoe.local/kubemoe-operator", ROOT / "operator/Dockerfile", ROOT / "operator"),
        # TORCH_INDEX empty: pip's default index (PyTorch's CPU index is not reachable here).
        Spec(
            "runtime-cpu",
            "kubemoe.local/kubemoe-runtime-cpu",
            ROOT / "runtime/Dockerfile.cpu",
            ROOT / "runtime",
            (("TORCH_INDEX", ""),),
        ),
    )
}


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kubemoe" / "images"


def _parse(dockerfile: bytes) -> list[dict[str, str]]:
    structure: list[dict[str, str]] = DockerfileParser(fileobj=io.BytesIO(dockerfile)).structure
    return structure


def copy_sources(dockerfile: bytes) -> list[str]:
    """The context paths the Dockerfile's COPY and ADD lines take (not those `--from` a stage)."""
    found: list[str] = []
    for ins in _parse(dockerfile):
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        value = ins["value"].strip()
        words = json.loads(value) if value.startswith("[") else value.split()
        if any(w.startswith("--from") for w in words):
            continue
        found += [w for w in [w for w in words if not w.startswith("--")][:-1] if w not in found]
    return found


def stages(dockerfile: bytes) -> list[str]:
    """The named stages before the last (built by name first, so their layers stay tagged)."""
    froms = [ins["value"].split() for ins in _parse(dockerfile) if ins["instruction"] == "FROM"]
    words = [[w for w in f if not w.startswith("--")] for f in froms[:-1]]
    return [w[2] for w in words if len(w) == 3 and w[1].lower() == "as"]


def _ignored(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in IGNORED)


def context_files(dockerfile: bytes, context: Path) -> Iterator[str]:
    """Each file (relative to `context`) the Dockerfile copies, in order, leftovers skipped."""
    seen: set[str] = set()
    for src in copy_sources(dockerfile):
        matches = sorted(context.glob(src)) if any(c in src for c in "*?[") else [context / src]
        if not matches or not all(p.exists() for p in matches):
            raise ImageBuildError(f"COPY {src}: nothing such in {context}")
        for path in matches:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                rel = f.relative_to(context)
                if not _ignored(rel) and str(rel) not in seen:
                    seen.add(str(rel))
                    yield str(rel)


def stage(spec: Spec, base_digest: str, dest: Path) -> str:
    """Copy the spec's Dockerfile and the files it copies into `dest` (Dockerfile, context/); return
    the sha256 of all that, the build arguments and the base's digest: the image's cache key."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "context").mkdir(parents=True)
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode() + data)

    add("schema", SCHEMA.encode())
    add("base", base_digest.encode())
    for key, value in sorted(spec.args):
        add(f"arg {key}", value.encode())
    dockerfile = spec.dockerfile.read_bytes()
    add("Dockerfile", dockerfile)
    (dest / "Dockerfile").write_bytes(dockerfile)
    for rel in context_files(dockerfile, spec.context):
        src, out = spec.context / rel, dest / "context" / rel
        data, executable = src.read_bytes(), bool(src.stat().st_mode & 0o111)
        add(f"file {rel} {'x' if executable else '-'}", data)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        out.chmod(0o755 if executable else 0o644)
    for path in (dest / "context").rglob("*"):
        os.utime(path, (MTIME, MTIME))
    return h.hexdigest()


def _record(cache: Path, name: str, tag: str) -> Path:
    return cache / f"{name}-{tag}.json"


def cached(cache: Path, name: str, tag: str) -> Image | None:
    record = _record(cache, name, tag)
    if not record.exists():
        return None
    data = json.loads(record.read_text())
    image = Image(data["ref"], Path(data["archive"]), data["size_bytes"], data["build_seconds"])
    return image if image.archive.exists() else None


def build_one(spec: Spec, base: images_base.Base, staged: Path, tag: str, cache: Path) -> Image:
    ref = f"{spec.repo}:{tag}"
    dockerfile = staged / "Dockerfile"
    args = {"BASE_IMAGE": base.ref, **dict(spec.args)}
    logs = cache / "logs"
    t0 = time.monotonic()
    named = stages(dockerfile.read_bytes())
    for st in named:
        images_buildah.bud(
            dockerfile=dockerfile,
            context=staged / "context",
            ref=f"{spec.repo}-{st}:{tag}",
            args=args,
            target=st,
            logfile=logs / f"{spec.name}-{st}.build.log",
        )
    images_buildah.bud(
        dockerfile=dockerfile,
        context=staged / "context",
        ref=ref,
        args=args,
        target=None,
        logfile=logs / f"{spec.name}.build.log",
    )
    built = time.monotonic() - t0
    archive = cache / f"{spec.name}-{tag}.tar"
    images_buildah.write_archive(ref, archive)
    total = round(time.monotonic() - t0, 1)
    image = Image(ref, archive, archive.stat().st_size, total)
    log(f"{ref}: built in {built:.0f}s, archive {image.size_bytes / 2**30:.2f} GiB in {total - built:.0f}s")
    _record(cache, spec.name, tag).write_text(json.dumps({**image.__dict__, "archive": str(archive)}))
    ours = re.compile(rf"{re.escape(spec.name)}-[0-9a-f]{{12}}\.(tar|json)")
    for old in cache.iterdir():
        if ours.fullmatch(old.name) and tag not in old.name:
            old.unlink()
    images_buildah.drop_old([spec.repo, *(f"{spec.repo}-{st}" for st in named)], keep=ref)
    return image


def ensure_images(names: Sequence[str] = ("operator", "runtime-cpu")) -> dict[str, Image]:
    """Each named image (keys of SPECS), built unless an archive for its current inputs exists."""
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (two e2e suites may start together)
        base_digest = images_base.digest()
        result: dict[str, Image] = {}
        base: images_base.Base | None = None
        for name in names:
            spec = SPECS[name]
            staged = cache / "stage" / name
            tag = stage(spec, base_digest, staged)[:12]
            image = cached(cache, name, tag)
            if image is None:
                log(f"{spec.repo}:{tag}: building {spec.dockerfile}")
                if base is None:
                    images_buildah.ensure_tools()
                    base = images_base.ensure(cache / "stage" / "python-base", cache / "logs")
                image = build_one(spec, base, staged, tag, cache)
            result[name] = image
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster.images", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SPECS), action="append", help="build just these")
    opts = parser.parse_args(argv)
    t0 = time.monotonic()
    found = ensure_images(opts.only or list(SPECS))
    for name, image in found.items():
        size, secs = image.size_bytes / 2**30, image.build_seconds
        print(f"{name:12} {image.ref:50} {size:6.2f} GiB  built in {secs:7.1f}s  {image.archive}")
    print(f"ensure_images: {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
