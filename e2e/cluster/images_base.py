"""The local base image the tests build kubemoe's images FROM (no public registry is reachable, so
not python:3.11.11-slim-bookworm): Debian bookworm by mmdebstrap, from this host's Debian apt
sources, with Python 3.11 as `python` and `pip` (a venv at /opt/python, first on PATH; pip from
PyPI), `useradd` and `apt-get` as in the python image, and this host's CA certificates (egress here
passes a TLS-intercepting proxy whose CA only the host's bundle has) for pip and apt alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster import images_buildah

REPO = "kubemoe.local/python-base"
SUITE = "bookworm"
# libpython3.11-dev: Python.h, as python:3.11-slim has it (torch's inductor, which vLLM's CPU build
# runs at start, compiles C++ against it: "fatal error: Python.h: No such file or directory").
PACKAGES = ("python3", "python3-venv", "libpython3.11-dev", "ca-certificates")
PIP_VERSION = "26.3"
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = Path("/etc/apt")
# As Debian's slim images: no docs, man pages or translations.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# Run on the host by mmdebstrap's customize hook: the host's CAs that the image's Debian bundle
# lacks become local CAs of the image (update-ca-certificates keeps them across later apt runs).
EXTRA_CAS = """\
import re, sys
from pathlib import Path
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, image, out = (Path(a) for a in sys.argv[1:4])
have = set(pem.findall(image.read_text()))
out.mkdir(parents=True, exist_ok=True)
extra = [c for c in pem.findall(host.read_text()) if c not in have]
for i, cert in enumerate(extra):
    (out / f"kubemoe-host-{i}.crt").write_text(cert + "\\n")
print(f"I: {len(extra)} CA certificates of the host added")
"""

CUSTOMIZE = """\
#!/bin/sh
set -eu
root="$1"
here="$(dirname "$0")"
run() {{ chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }}
{python} "$here/extra_cas.py" {bundle} "$root/etc/ssl/certs/ca-certificates.crt" \\
    "$root/usr/local/share/ca-certificates"
run update-ca-certificates
cp "$here/pip.conf" "$root/etc/pip.conf"
run python3 -m venv /opt/python
run /opt/python/bin/pip install --no-cache-dir pip=={pip}
echo "I: python $(run /opt/python/bin/python --version), $(run /opt/python/bin/pip --version)"
"""

# pip everywhere in images built FROM the base: the system bundle (with the host's CAs), and
# downloads resumed when the registry cuts one short (torch pulls ~3 GB).
PIP_CONF = """\
[global]
cert = /etc/ssl/certs/ca-certificates.crt
timeout = 180
resume-retries = 20
"""

DOCKERFILE = """\
FROM scratch
ADD rootfs.tar /
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
CMD ["python"]
"""


def apt_sources(etc_apt: Path = APT_SOURCES) -> list[Path]:
    """This host's enabled apt sources for Debian's own archive (not third-party ones)."""
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    return [
        f
        for f in files
        if f.suffix in (".list", ".sources") and f.is_file() and re.search(r"/debian\b", f.read_text())
    ]


@dataclass(frozen=True)
class Base:
    ref: str
    digest: str  # sha256 of the build inputs: what images built FROM it hash


def inputs() -> dict[str, bytes]:
    """Everything the base is made from, by name: what its hash covers."""
    sources = apt_sources()
    if not sources:
        raise images_buildah.ImageBuildError(f"no Debian apt sources under {APT_SOURCES}")
    if not HOST_BUNDLE.is_file():
        raise images_buildah.ImageBuildError(f"{HOST_BUNDLE} missing (install ca-certificates)")
    found = {f"source {p}": p.read_bytes() for p in sources}
    found["ca bundle"] = HOST_BUNDLE.read_bytes()
    found["extra_cas.py"] = EXTRA_CAS.encode()
    found["customize.sh"] = CUSTOMIZE.encode()
    found["pip.conf"] = PIP_CONF.encode()
    found["Dockerfile"] = DOCKERFILE.encode()
    found["mmdebstrap"] = " ".join((SUITE, *PACKAGES, *DPKG_EXCLUDES, PIP_VERSION)).encode()
    return found


def digest() -> str:
    h = hashlib.sha256()
    for name, data in sorted(inputs().items()):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def build(stage: Path, ref: str, logdir: Path) -> None:
    """mmdebstrap a rootfs tarball into `stage`, then `buildah bud` it into `ref`."""
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "extra_cas.py").write_text(EXTRA_CAS)
    (stage / "pip.conf").write_text(PIP_CONF)
    (stage / "Dockerfile").write_text(DOCKERFILE)
    hook = stage / "customize.sh"
    hook.write_text(
        CUSTOMIZE.format(python=sys.executable, bundle=shlex.quote(str(HOST_BUNDLE)), pip=PIP_VERSION)
    )
    hook.chmod(0o755)
    rootfs = stage / "rootfs.tar"
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    cmd += [f"--dpkgopt={o}" for o in DPKG_EXCLUDES]
    cmd += [f"--customize-hook={hook}", SUITE, str(rootfs), *map(str, apt_sources())]
    # A clean environment: the host's pip settings (PIP_FIND_LINKS, ...) must not reach the chroot.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    env |= {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    images_buildah.stream(cmd, logfile=logdir / "python-base.mmdebstrap.log", what="mmdebstrap", env=env)
    images_buildah.bud(
        dockerfile=stage / "Dockerfile",
        context=stage,
        ref=ref,
        args={},
        target=None,
        logfile=logdir / "python-base.build.log",
    )
    rootfs.unlink()


def ensure(stage: Path, logdir: Path) -> Base:
    """The base image in buildah's storage, built if its inputs changed or it is gone."""
    d = digest()
    base = Base(ref=f"{REPO}:{d[:12]}", digest=d)
    if not images_buildah.exists(base.ref):
        images_buildah.log(f"base image {base.ref}: building (mmdebstrap {SUITE}, Python 3.11)")
        build(stage, base.ref, logdir)
        images_buildah.drop_old([REPO], keep=base.ref)
    return base
