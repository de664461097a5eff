"""Debian's buildah, driven for e2e/cluster/images.py: builds with progress lines, OCI archives, and
keeping /var/lib/containers from growing (old tags of ours removed, dangling layers pruned)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from e2e.cluster import build

# Debian packages: buildah (1.28 in bookworm; runs RUN steps with Debian's runc), mmdebstrap (the
# local base image). Installed on first use.
DEBIAN_PACKAGES = ("buildah", "runc", "mmdebstrap")
TOOLS = ("buildah", "runc", "mmdebstrap")
# A build whose output tail matches this failed on the network (a registry cut a download short,
# a name did not resolve): it is tried again, from buildah's layer cache.
NETWORK_ERROR = re.compile(
    r"ReadTimeoutError|IncompleteRead|ProtocolError|Connection(Reset|Error)|Temporary failure"
    r"|Could not fetch URL|Failed to fetch|Max retries exceeded|THESE PACKAGES DO NOT MATCH THE HASHES"
)
TRIES = 3
# buildah's "STEP 2/5: ..." ("[1/2] STEP 2/5: ..." in multi-stage builds), mmdebstrap's "I: ...".
STEP_LINE = re.compile(r"(\[\d+/\d+\] )?STEP \d+/\d+: |I: ")


class ImageBuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    build.log(f"images: {msg}")


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (buildah's storage, mmdebstrap's chroot)")
    build.apt_install(DEBIAN_PACKAGES, tools=TOOLS)


def stream(cmd: Sequence[str], *, logfile: Path, what: str, env: Mapping[str, str] | None = None) -> None:
    """Run `cmd` under nice, its output into `logfile`; log its STEP lines (buildah) or I: lines
    (mmdebstrap) with the elapsed time, and a line every 2 min of a long step; raise with the tail."""
    t0 = time.monotonic()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    argv = ["nice", "-n", "10", *cmd]
    with logfile.open("wb") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        fd, pending, step, said = proc.stdout.fileno(), b"", "start", time.monotonic()
        while True:
            if time.monotonic() - said >= 120:
                log(f"{what}: still at {step[:60]} (+{time.monotonic() - t0:.0f}s)")
                said = time.monotonic()
            ready, _, _ = select.select([fd], [], [], 30)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out.write(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if STEP_LINE.match(line):
                    step, said = line[:100], time.monotonic()
                    log(f"{what}: {step} (+{said - t0:.0f}s)")
        rc = proc.wait()
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-40:]
        raise ImageBuildError(
            f"{what} failed ({rc}) at {step}; full log {logfile}; its last lines:\n" + "\n".join(tail)
        )


def buildah(*args: str) -> str:
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"buildah {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def exists(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True).returncode == 0


def bud(
    *, dockerfile: Path, context: Path, ref: str, args: Mapping[str, str], target: str | None, logfile: Path
) -> None:
    """`buildah bud` with its layer cache, host network, retried on network failures."""
    cmd = ["buildah", "bud", "--layers", "--force-rm", "--pull-never", "--format", "oci"]
    cmd += ["--network", "host", "-f", str(dockerfile), "-t", ref]
    cmd += [f"--build-arg={k}={v}" for k, v in sorted(args.items())]
    cmd += ["--target", target] if target else []
    for attempt in range(1, TRIES + 1):
        try:
            stream([*cmd, str(context)], logfile=logfile, what=f"build {ref}")
            return
        except ImageBuildError as err:
            if attempt == TRIES or not NETWORK_ERROR.search(str(err)):
                raise
            log(f"build {ref}: network error (try {attempt} of {TRIES}); trying again in 20 s")
            time.sleep(20)


def write_archive(ref: str, archive: Path) -> None:
    """The image as an OCI archive (a plain tar; its layers gzip-compressed, as an OCI layout's always
    are: buildah's --disable-compression does not apply there) named `ref` inside, which `ctr images
    import` names the image by; written beside and renamed into place."""
    tmp = archive.with_name(f".{archive.name}.tmp")
    tmp.unlink(missing_ok=True)
    buildah("push", "--quiet", ref, f"oci-archive:{tmp}:{ref}")
    tmp.rename(archive)


def tags(repo: str) -> list[str]:
    out = buildah("images", "--format", "{{.Name}}:{{.Tag}}")
    return [line for line in out.split() if line.rsplit(":", 1)[0] == repo]


def drop_old(repos: Sequence[str], keep: str) -> None:
    """Remove every tag of `repos` but `keep`'s tag, then the dangling images that leaves (old
    layer-cache steps); layers still under a kept tag stay, so the cache survives."""
    tag = keep.rsplit(":", 1)[1]
    old = [t for repo in repos for t in tags(repo) if t.rsplit(":", 1)[1] != tag]
    for ref in old:
        buildah("rmi", ref)
    if old:
        log(f"removed old images {' '.join(old)}")
    buildah("rmi", "--prune")
