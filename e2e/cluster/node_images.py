"""The real node's own small images, written as OCI archives for `ctr images import`: no registry
is reachable, so the sandbox ("pause") image is a static Go program built here and a busybox image
comes from Debian's busybox-static (for smoke checks)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from e2e.cluster import realnode_build

PAUSE_IMAGE = "kubemoe.local/pause:1"
BUSYBOX_IMAGE = "kubemoe.local/busybox:1"


def _blob(out: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def _layer(files: dict[str, tuple[bytes, int]], links: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = sorted({str(Path(p).parent) for p in (*files, *links) if str(Path(p).parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            t.addfile(info)
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            t.addfile(info, io.BytesIO(data))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            t.addfile(info)
    return buf.getvalue()


def oci_archive(
    ref: str, files: dict[str, tuple[bytes, int]], links: dict[str, str], config: dict[str, Any]
) -> bytes:
    """A single-layer OCI image layout as a tar stream, named `ref` for `ctr images import`."""
    layer = _layer(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    gz = gzip.compress(layer, mtime=0)
    out_buf = io.BytesIO()
    with tarfile.open(fileobj=out_buf, mode="w") as out:
        layer_digest, layer_size = _blob(out, gz)
        cfg = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
        cfg_digest, cfg_size = _blob(out, cfg)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cfg_digest,
                    "size": cfg_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": layer_size,
                    }
                ],
            }
        ).encode()
        m_digest, m_size = _blob(out, manifest)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": m_digest,
                        "size": m_size,
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                        },
                    }
                ],
            }
        ).encode()
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
    return out_buf.getvalue()


BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "sleep",
    "cat",
    "ls",
    "date",
    "httpd",
    "hostname",
    "ip",
    "wget",
    "id",
    "env",
    "mkdir",
    "touch",
    "ps",
    "nslookup",  # busybox's own resolver: the static glibc build's getaddrinfo has no NSS here
    "nc",
)


def image_archives(bins: realnode_build.Paths) -> dict[str, bytes]:
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    env = ["PATH=/bin"]
    return {
        PAUSE_IMAGE: oci_archive(
            PAUSE_IMAGE,
            {"pause": ((bins.bin / "pause").read_bytes(), 0o755)},
            {},
            {"Entrypoint": ["/pause"], "Env": env, "User": "65535:65535"},
        ),
        BUSYBOX_IMAGE: oci_archive(
            BUSYBOX_IMAGE,
            {"bin/busybox": (busybox, 0o755), "tmp/.keep": (b"", 0o644)},
            {f"bin/{a}": "busybox" for a in BUSYBOX_APPLETS},
            {"Cmd": ["/bin/sh"], "Env": env},
        ),
    }
